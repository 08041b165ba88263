"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a stage under Lightning's `ModelParallelStrategy`
(`trainer=fsdp2`, `trainer=fsdp2_cpu`; the strategy class is `stages.strategies.FSDP2Strategy`).

`Stage.configure_model` calls `shard_stage`, which makes these FSDP units, innermost first, on
the data-parallel mesh (every parameter `Shard(0)` across all ranks):
1. each transformer block (`EncoderLayer`, `DecoderLayer`): the student's towers, the LocCa
   decoder, the EMA teacher's tower;
2. the student's image and text towers, the EMA teacher's image tower, the LocCa head (its
   vocabulary projection is read by the loss inside `LoccaHead.forward`);
3. the stage itself, holding the rest: logit scale and bias, the distillation heads (student
   and teacher), the mask token, the DINO centres (buffers, replicated). The stage's
   `training_step` is registered as an FSDP forward method, so these are gathered for the
   whole step and their gradients reduce-scattered after the backward. The distillation
   heads stay in this unit (not units of their own) because the step reads the dormant
   losses' parameters outside their modules' forward (the weight-0 term that keeps every
   parameter in the graph).

The EMA teacher's parameters have the same global shapes and placements as the student's
(FSDP2 shards every parameter on dim 0 of the same mesh, whatever the unit), so each rank's
teacher shard holds the same elements as its student shard and the EMA update
(`siglip2.model.ema`, `torch._foreach_*` on DTensors) is the elementwise formula on the local
shards; `check_ema_pairs` asserts it.

Precision: `32-true`, or `bf16-mixed` (Lightning's autocast) where the blocks, towers and LocCa
head all-gather bf16 copies of their parameters and reduce gradients in fp32. The sharded
parameters, the optimiser and the EMA teacher stay fp32, and so does the stage's own unit
(logit scale and bias, heads). Half-precision weights (`bf16-true`, `16-true`) would cast the
EMA teacher and are refused.

`torch.compile` (`model.compile=true`): each transformer block of the student's towers is
compiled, then sharded (torch's recommended order for FSDP2: per-block compile, FSDP hooks
outside the compiled regions).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

SUPPORTED_PRECISION = ("32-true", "bf16-mixed")


def is_fsdp2(stage) -> bool:
    """The stage runs under Lightning's `ModelParallelStrategy` (FSDP2)."""
    trainer = getattr(stage, "_trainer", None)
    if trainer is None:
        return False
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def data_parallel_mesh(stage):
    """The 1-D data-parallel mesh of the strategy's device mesh; a tensor-parallel dimension
    larger than 1 is refused (the stages apply no tensor parallelism)."""
    mesh = stage.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()}: the "
            "stages shard with FSDP2 over data-parallel ranks only and apply no tensor parallelism; "
            "use trainer=fsdp2 (stages.strategies.FSDP2Strategy, tensor_parallel_size 1)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def _blocks(module: nn.Module) -> list[nn.Module]:
    from siglip2.model.decoder import DecoderLayer
    from siglip2.model.layers import EncoderLayer

    return [m for m in module.modules() if isinstance(m, (EncoderLayer, DecoderLayer))]


def shard_stage(stage) -> None:
    """Apply `fully_shard` to the stage's units (module docstring); idempotent."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(stage, FSDPModule):
        return
    precision = str(stage.trainer.precision)
    if precision not in SUPPORTED_PRECISION:
        raise ValueError(
            f"ModelParallelStrategy (FSDP2) with precision={precision!r}: the stages support "
            f"{' or '.join(SUPPORTED_PRECISION)}; half-precision weights would cast the EMA teacher, "
            "which must stay fp32 (its update falls below bf16 resolution)"
        )
    mesh = data_parallel_mesh(stage)
    compute = torch.bfloat16 if precision == "bf16-mixed" else None
    # cast_forward_inputs=False: activations keep the dtype autocast gives them (the residual
    # stream stays fp32, as under DDP); only the gathered weights are bf16.
    low = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)

    model = stage.model
    if stage.compile_towers and not getattr(stage, "_compiled", False):
        for block in _blocks(model.vision_model) + _blocks(model.text_model):
            block.compile()
        stage._compiled = True

    towers: list[nn.Module] = [model.vision_model, model.text_model]
    teacher = getattr(stage, "teacher", None)
    if teacher is not None:
        towers.append(teacher.vision)
    decoder = stage.locca_decoder()
    if decoder is not None:
        towers.append(stage.losses["locca"])
    for block in _blocks(stage):
        fully_shard(block, mesh=mesh, mp_policy=low)
    for tower in towers:
        fully_shard(tower, mesh=mesh, mp_policy=low)
    fully_shard(stage, mesh=mesh)  # the rest, fp32
    register_fsdp_forward_method(stage, "training_step")
    if teacher is not None:
        check_ema_pairs(stage)


def check_ema_pairs(stage) -> None:
    """Every (teacher, student) parameter pair of the EMA has the same global shape and
    placements (`EMATeacher._pairs` raises otherwise) and the same local shard, so that the
    elementwise update on local shards is the update of the whole tensors."""
    teacher, student = stage.teacher._pairs(stage.model.vision_model, stage.distill_heads())
    bad = [(tuple(t.shape), tuple(s.shape)) for t, s in zip(teacher, student) if t.shape != s.shape]
    if bad:
        raise RuntimeError(
            f"FSDP2: {len(bad)} EMA teacher/student shards differ in shape (e.g. {bad[:3]}); "
            "the EMA update would mix different elements"
        )


def local_value(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, the same on every rank) as `like` holds it: for a DTensor its
    local shard (no communication), else `value` itself, on `like`'s device and dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of `module`'s parameters and buffers (state-dict names), gathered from the
    shards: a collective, every rank must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        out[name] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).clone()
    return out


def load_full(dst: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    dst.load_state_dict(dict(state), strict=True)
    return dst


@torch.no_grad()
def reinit_module(module: nn.Module, fresh: Mapping[str, torch.Tensor]) -> None:
    """`stages.sharding.reinit_module` under FSDP2: each parameter (a DTensor, outside the
    step) takes its own shard of the fresh whole value, computed alike on every rank; buffers
    are whole on every rank."""
    own = dict([*module.named_parameters(), *module.named_buffers()])
    missing = sorted(set(own) - set(fresh))
    if missing:
        raise ValueError(f"re-initialisation lacks {missing[:5]}")
    for name, tensor in own.items():
        tensor.copy_(local_value(fresh[name], tensor))


def plain_model(stage) -> tuple[nn.Module, nn.Module | None]:
    """`stages.sharding.plain_model` under FSDP2: unsharded fp32 copies of the two towers and
    the LocCa decoder (gathered: every rank must call it)."""
    from siglip2.model import build_model

    model, decoder = stage.model, stage.locca_decoder()
    copies = [load_full(build_model(model.config.to_dict()), full_state(model))]
    if decoder is not None:
        copies.append(load_full(decoder.rebuild(), full_state(decoder)))
    device = stage.device
    copies = [c.to(device).eval() for c in copies]
    return copies[0], (copies[1] if decoder is not None else None)
