"""The few operations whose correct form depends on how the strategy holds the weights.

A stage writes its own parameters in two places, and reads all of them in a third:
- the switch at 80% re-initialises the distillation heads (`reinit_module`) and clears
  their optimiser state (`reset_optimizer_state`);
- evaluation during training runs the towers outside the training forward (`plain_model`).

Under DDP (or one process) every rank holds whole tensors and these are plain copies. Under
FSDP (Lightning's `FSDPStrategy`, `use_orig_params=True`) a parameter outside its unit's
forward is a 1-D view of this rank's shard: writes go through `summon_full_params(writeback=
True)` (every rank takes part), and evaluation gets an unsharded copy. The FSDP2 and
DeepSpeed branches live here too, next to these.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from stages import fsdp2

# Name parts that wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter or buffer name with the wrappers' inserted parts removed (the name it has
    in the unwrapped stage, as in `state_dict()` keys)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _strategy(stage) -> Any:
    trainer = getattr(stage, "_trainer", None)
    return None if trainer is None else trainer.strategy


def is_fsdp1(stage) -> bool:
    """Lightning's `FSDPStrategy` (torch FSDP1 with flat parameters)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(_strategy(stage), FSDPStrategy)


def fsdp_root(stage) -> nn.Module | None:
    """The root `FullyShardedDataParallel` module of an FSDP1 run, else None."""
    if not is_fsdp1(stage):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = _strategy(stage).model
    return root if isinstance(root, FSDP) else None


@contextlib.contextmanager
def full_params(stage, writeback: bool) -> Iterator[None]:
    """Inside, every parameter of the stage has its full shape (FSDP1: gathered on every rank;
    a collective, so every rank must enter; `writeback=True` writes changes back into the
    shards). Elsewhere a no-op."""
    root = fsdp_root(stage)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(root, writeback=writeback, recurse=True):
        yield


@torch.no_grad()
def reinit_module(stage, module: nn.Module, fresh: Mapping[str, torch.Tensor]) -> None:
    """Write `fresh` (the `state_dict()` of a newly built module of the same class: parameters
    and buffers, unwrapped names) into `module`, a part of `stage`, so that the next
    optimiser step starts from these values whatever the strategy (the parameters keep their
    identity: the optimiser and the wrappers still hold them)."""
    if fsdp2.is_fsdp2(stage):  # FSDP2: each DTensor takes its own shard of the fresh value
        fsdp2.reinit_module(module, fresh)
        return
    with full_params(stage, writeback=True):
        own = {clean_name(n): t for n, t in [*module.named_parameters(), *module.named_buffers()]}
        missing = sorted(set(own) - set(fresh))
        if missing:
            raise ValueError(f"re-initialisation lacks {missing[:5]}")
        for name, tensor in own.items():
            tensor.data.copy_(fresh[name].to(device=tensor.device, dtype=tensor.dtype))


def reset_optimizer_state(stage, params: Iterable[nn.Parameter]) -> None:
    """Fresh optimiser state (moments and step count) for `params` in every optimiser of the
    run: the next step treats them as new, as at the switch of the recipe."""
    trainer = getattr(stage, "_trainer", None)
    if trainer is None:
        return
    params = list(params)
    for optimizer in trainer.optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer
        for p in params:
            inner.state.pop(p, None)


def plain_model(stage) -> tuple[nn.Module, nn.Module | None]:
    """(two-tower model, LocCa decoder or None) that run outside the training forward on this
    rank: the stage's own modules when they hold whole tensors; under FSDP1 an unsharded
    copy in the parameters' own dtype (every rank must call this: it gathers)."""
    if fsdp2.is_fsdp2(stage):  # FSDP2: gathered from the DTensor shards
        return fsdp2.plain_model(stage)
    model, decoder = stage.model, stage.locca_decoder()
    if fsdp_root(stage) is None:
        return model, decoder
    from siglip2.model import build_model

    copies = [build_model(model.config.to_dict())]
    sources = [model]
    if decoder is not None:
        copies.append(decoder.rebuild())
        sources.append(decoder)
    with full_params(stage, writeback=False):
        for src, dst in zip(sources, copies):
            state = {clean_name(n): t.detach().clone() for n, t in [*src.named_parameters(), *src.named_buffers()]}
            dst.load_state_dict(state, strict=True)
    device = next(iter(state.values())).device
    copies = [c.to(device).eval() for c in copies]
    return copies[0], (copies[1] if decoder is not None else None)

