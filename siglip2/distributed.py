"""Small torch.distributed helpers shared by the losses and the evaluation code.

Everything here degrades to a no-op in a single process (torch.distributed not
initialised, or world size 1), so library code can call it unconditionally.
"""

from typing import Any, List, Optional

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands every rank the gradient of its own slice,
    summed over all ranks.

    Each rank's loss uses every rank's tensor, so the gradient w.r.t. rank r's tensor is the
    sum over ranks of d(loss_rank)/d(tensor_r): a reduce-scatter (SUM) of the gathered
    gradient. This is what `torch.distributed.nn.all_gather` and open_clip's neighbour
    exchange do; with DDP's gradient averaging on top, the parameters then receive the
    gradient of the mean of the per-rank losses.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        tensor = tensor.contiguous()
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = tensor.shape[0]
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor, group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty((ctx.n,) + grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        else:  # gloo has no reduce_scatter: all_reduce and keep our slice
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
            out = grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]
        return out, None


# Shapes already found equal on every rank, per group: (id(group), shape) (see `check_same_shape`).
_CHECKED_SHAPES: set = set()
_SHAPE_SLOTS = 9  # ndim + up to 8 sizes, so every rank's record has the same length


def _reading_syncs(tensor: torch.Tensor) -> bool:
    """Whether reading a collective's result on the host waits for the device (not on the CPU)."""
    return tensor.device.type != "cpu"


def check_same_shape(tensor: torch.Tensor, group=None, what: str = "all_gather_with_grad") -> None:
    """Raise a `ValueError` on every rank, naming each rank's shape, when the ranks of `group`
    pass tensors of different shapes to a collective that needs equal ones; no-op in a single
    process. Without it gloo aborts the processes in C++ and NCCL hangs or gathers garbage.

    The check is one small all_gather of the shapes, read on the host. When is it made:
    - CPU tensors (gloo): on every call. Reading the result costs no device sync.
    - accelerator tensors (NCCL): on the first call with each shape, per process and group.
      Reading the gathered shapes is a host sync, which the training step must not make
      every step; the distinct shapes of a run are few (one, or one per NaFlex batch plan),
      so this is a handful of syncs per run. Ranks that pass equal shapes (a correct run)
      see the same sequence of shapes, so they all decide alike and issue the check
      together. What this catches on GPUs: any mismatch on a shape no rank has used before
      (the first step; per-rank batch settings that differ; a plan that differs between
      ranks). What it cannot catch without a sync every step: one rank changing to a new
      shape while another repeats a shape it already used (then the two ranks issue
      different collectives, as they would without the check).
    """
    if not is_distributed(group) or tensor.ndim + 1 > _SHAPE_SLOTS:
        return
    key = (id(group), tuple(tensor.shape))
    if _reading_syncs(tensor) and key in _CHECKED_SHAPES:
        return
    record = [tensor.ndim, *tensor.shape] + [0] * (_SHAPE_SLOTS - 1 - tensor.ndim)
    mine = torch.tensor(record, dtype=torch.long, device=tensor.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    shapes = [tuple(r[1 : 1 + r[0]]) for r in (g.tolist() for g in gathered)]
    if any(s != shapes[0] for s in shapes):
        sizes = ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(shapes))
        raise ValueError(
            f"{what}: the ranks pass tensors of different shapes ({sizes}); every rank must pass the "
            "same shape, e.g. the same per-rank batch size (all_gather_variable gathers tensors whose "
            "first dimension differs between ranks, without gradient)"
        )
    _CHECKED_SHAPES.add(key)


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all_gather, concatenated along dim 0 in rank order.

    Every rank must pass the same shape: a mismatch is a `ValueError` on every rank naming
    each rank's shape (`check_same_shape`, which says when it is checked). Identity in a
    single process.
    """
    if not is_distributed(group):
        return tensor
    check_same_shape(tensor, group)
    return _AllGatherWithGrad.apply(tensor, group)


@torch.no_grad()
def all_gather_variable(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """all_gather of tensors whose dim 0 differs between ranks (no gradient).

    Collectives need equal shapes, so each rank pads to the largest length, and the padding
    is cut off again after the gather. Result is concatenated in rank order.
    """
    if not is_distributed(group):
        return tensor
    tensor = tensor.contiguous()
    world = dist.get_world_size(group)
    n = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    max_n = max(sizes)
    padded = tensor.new_zeros((max_n,) + tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def all_gather_object(obj: Any, group=None) -> List[Any]:
    """all_gather_object returning a list (one entry per rank); [obj] in a single process."""
    if not is_distributed(group):
        return [obj]
    out: List[Optional[Any]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of `tensor` over ranks (a new tensor; the input itself when not distributed).
    Every rank must call it with the same shape."""
    if is_distributed(group):
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
    return tensor
