"""The few operations whose correct form depends on how the strategy holds the weights.

A stage writes its own parameters in two places, and reads all of them in a third:
- the switch at 80% re-initialises the distillation heads (`reinit_module`) and clears
  their optimiser state (`reset_optimizer_state`);
- evaluation during training runs the towers outside the training forward (`plain_model`).

Under DDP (or one process) every rank holds whole tensors and these are plain copies. Under
FSDP (Lightning's `FSDPStrategy`, `use_orig_params=True`) a parameter outside its unit's
forward is a 1-D view of this rank's shard: writes go through `summon_full_params(writeback=
True)` (every rank takes part), and evaluation gets an unsharded copy. The FSDP2 and
DeepSpeed branches live here too, next to these. DeepSpeed (ZeRO-1/2) holds whole parameters
but steps fp32 masters of its own: writes also go into those, the optimiser state is per flat
group, and the EMA teacher, which the engine casts to bf16 with everything else, is put back
to fp32 (`teacher_setup`).
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


def fsdp_wrap_classes() -> set[type[nn.Module]]:
    """The FSDP units (conf/trainer/fsdp.yaml): each transformer block, and each image tower and
    distillation head as a whole. The last two make the EMA teacher's units the same shape as
    the student's (a `VisionTransformer` and a `DINOHead` each), so that every teacher shard
    holds the same elements as its student shard and the EMA update runs shard by shard."""
    from siglip2.losses.distill import DINOHead
    from siglip2.model.decoder import DecoderLayer
    from siglip2.model.layers import EncoderLayer
    from siglip2.model.vit import VisionTransformer

    return {EncoderLayer, DecoderLayer, VisionTransformer, DINOHead}


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
    if is_deepspeed(stage):  # and into the fp32 masters the engine steps
        _deepspeed_write_masters(stage, module, fresh)


def reset_optimizer_state(stage, params: Iterable[nn.Parameter]) -> None:
    """Fresh optimiser state (moments and step count) for `params` in every optimiser of the
    run: the next step treats them as new, as at the switch of the recipe."""
    trainer = getattr(stage, "_trainer", None)
    if trainer is None:
        return
    params = list(params)
    if is_deepspeed(stage):  # state per flat fp32 group
        _deepspeed_reset_optimizer_state(stage, params)
        return
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
    if is_deepspeed(stage):  # whole parameters; an fp32 copy from the masters under bf16
        return _deepspeed_plain_model(stage, model, decoder)
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


# ---- DeepSpeed ZeRO-1/2 ----------------------------------------------------------------
# The engine keeps every parameter whole on every rank in the training dtype (bf16 under
# bf16) and steps flat fp32 masters, one per optimiser group, each split across the ranks;
# after every step it copies the masters back into the parameters. A value written only into
# a parameter is therefore gone at the next step, and the optimiser state lives per flat
# group, not per parameter. The engine also casts every parameter, the EMA teacher's
# included, to the training dtype.


def is_deepspeed(stage) -> bool:
    """Lightning's `DeepSpeedStrategy` (or `stages.strategies.CPUDeepSpeedStrategy`)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(_strategy(stage), DeepSpeedStrategy)


def _zero_optimizer(stage) -> Any:
    """The engine's ZeRO-1/2 optimiser (flat fp32 groups), or None before the engine exists."""
    for optimizer in getattr(getattr(stage, "_trainer", None), "optimizers", None) or []:
        if hasattr(optimizer, "single_partition_of_fp32_groups"):
            return optimizer
    return None


@torch.no_grad()
def _deepspeed_write_masters(stage, module: nn.Module, fresh: Mapping[str, torch.Tensor]) -> None:
    """`reinit_module` under DeepSpeed, after the parameters were written: the same values
    into the fp32 masters (each rank writes the slice it holds; no collective)."""
    if _zero_optimizer(stage) is None:
        return  # no engine yet: it builds its masters from the parameters
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in module.named_parameters():
        if p.requires_grad:
            safe_set_full_fp32_param(p, fresh[clean_name(name)].to(device=p.device, dtype=torch.float32))


@torch.no_grad()
def _deepspeed_reset_optimizer_state(stage, params: list) -> None:
    """`reset_optimizer_state` under DeepSpeed. `params`: module parameters, or the flat fp32
    groups the optimiser's param_groups hold. A flat group all of whose parameters are named
    gets fresh state (moments and step count zeroed in place, which is what a new state is; the
    engine keeps references to these tensors). Parameters that share a group with others get
    their moments zeroed; the group's step count is shared and goes on (the stages' lr gates
    give every loss's parameters groups of their own, so this does not happen there)."""
    zero = _zero_optimizer(stage)
    if zero is None:
        return
    flats = zero.single_partition_of_fp32_groups
    flat_index = {id(f): i for i, f in enumerate(flats)}
    ids = {id(p) for p in params}
    whole = {flat_index[id(p)] for p in params if id(p) in flat_index}
    partial = []
    for i, group in enumerate(zero.bit16_groups):
        inside = [p for p in group if id(p) in ids]
        if inside and len(inside) == len(group):
            whole.add(i)
        elif inside:
            partial += inside
    for i in sorted(whole):
        for value in zero.optimizer.state.get(flats[i], {}).values():
            if torch.is_tensor(value):
                value.zero_()
    if partial:
        from deepspeed.utils import safe_set_full_optimizer_state

        for p in partial:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or mapping.optim_fragment is None:
                continue  # no slice of it on this rank, or no step taken yet
            for key in mapping.get_optim_state_keys():
                safe_set_full_optimizer_state(p, torch.zeros_like(p, dtype=torch.float32), key)


def _deepspeed_plain_model(stage, model: nn.Module, decoder: nn.Module | None):
    """`plain_model` under DeepSpeed: ZeRO-1/2 holds whole parameters, so in fp32 (where they
    equal the masters after every step) the stage's own modules; in bf16/fp16 an fp32 copy
    from the masters (a collective per parameter: every rank must call this)."""
    modules = [model] + ([decoder] if decoder is not None else [])
    if all(p.dtype == torch.float32 for m in modules for p in m.parameters()):
        return model, decoder
    from deepspeed.utils import safe_get_full_fp32_param

    from siglip2.model import build_model

    copies = [build_model(model.config.to_dict())] + ([decoder.rebuild()] if decoder is not None else [])
    device = next(model.parameters()).device
    for src, dst in zip(modules, copies):
        state = {}
        for name, p in src.named_parameters():
            full = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None
            state[clean_name(name)] = (p if full is None else full).detach().float().clone()
        for name, b in src.named_buffers():
            state[clean_name(name)] = b.detach().float().clone() if b.is_floating_point() else b.detach().clone()
        dst.load_state_dict(state, strict=True)
    copies = [c.to(device).eval() for c in copies]
    return copies[0], (copies[1] if decoder is not None else None)


def _autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run `module`'s forward under autocast to `dtype` (its weights stay as they are)."""
    if getattr(module, "_siglip2_autocast", None) == (device_type, dtype):
        return
    inner = type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return inner(*args, **kwargs)

    module.forward = forward
    module._siglip2_autocast = (device_type, dtype)


@torch.no_grad()
def _deepspeed_teacher_setup(stage) -> None:
    """The EMA teacher under DeepSpeed: ZeRO-3 is refused; under bf16/fp16 the engine has cast
    the teacher to that dtype, where an EMA step at m = 0.996 falls below its resolution. The
    teacher goes back to fp32 (its values from before the engine, when `teacher_setup` ran
    then too, else the cast ones: a copy of the student either way until the switch or a
    resume writes it) and runs under autocast to the training dtype, as under DDP's bf16-mixed."""
    strategy = _strategy(stage)
    if getattr(strategy, "config", None) and strategy.zero_stage_3:
        raise ValueError(
            f"{type(strategy).__name__}: DeepSpeed ZeRO-3 partitions every parameter, and the stages "
            "read whole parameters outside the engine's forward (the EMA teacher's update, the switch's "
            "re-initialisation, evaluation): use ZeRO stage 2 (conf/trainer/deepspeed_stage_2.yaml)"
        )
    teacher = getattr(stage, "teacher", None)
    if teacher is None:
        return
    if _zero_optimizer(stage) is None:  # before the engine: keep the fp32 values it will cast away
        stage._teacher_fp32 = {
            n: t.detach().clone()
            for n, t in teacher.state_dict().items()
            if t.is_floating_point() and t.dtype == torch.float32
        }
        return
    dtype = next(p.dtype for p in stage.model.parameters())
    saved = getattr(stage, "_teacher_fp32", None) or {}
    for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = saved[name].to(t.device) if name in saved else t.data.float()
    stage._teacher_fp32 = None
    if dtype != torch.float32:
        device_type = next(teacher.parameters()).device.type
        for module in [teacher.vision, *teacher.heads.values()]:
            _autocast_forward(module, device_type, dtype)


def teacher_setup(stage) -> None:
    """The EMA teacher as the strategy must hold it. Called before the strategy wraps the stage
    (`setup`) and after (`on_fit_start`); DeepSpeed: fp32 again, run under autocast."""
    if is_deepspeed(stage):
        _deepspeed_teacher_setup(stage)
