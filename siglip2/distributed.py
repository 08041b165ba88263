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
            out = grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]
        return out, None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all_gather, concatenated along dim 0 in rank order.

    Every rank must pass the same shape. Identity in a single process.
    """
    if not is_distributed(group):
        return tensor
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
    padded[:tensor.shape[0]] = tensor
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
