"""The EMA teacher of self-distillation [P §2.3; SILC; DINO `student -> teacher` update].

teacher <- m * teacher + (1 - m) * student, after every optimiser step, for the vision tower
(patch embedding, encoder, MAP head) and the teacher copies of the distillation heads. The
teacher has no gradient (`requires_grad=False`): it is in no optimiser group and DDP's
reducer skips it, but it is a submodule of the stage, so checkpoints hold it and a resumed
run continues with the same teacher. The momentum comes from `siglip2.schedule.ema_momentum`
(fixed 0.996 by default, RECIPE.md). Under FSDP the update runs on whatever each rank holds
(its local shards), the same elementwise formula; FSDP2 DTensors are updated through their
local shards, which hold the same elements for a teacher and its student (checked).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


def _local(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a DTensor's (FSDP2) local shard, which must hold the same
    elements as `other`'s (same global shape and placements), else `t` itself."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if not isinstance(other, DTensor) or t.shape != other.shape or t.placements != other.placements:
        raise ValueError(
            "teacher and student parameters are sharded differently: the EMA update would mix "
            f"different elements ({tuple(t.shape)} {t.placements} vs {tuple(other.shape)} "
            f"{getattr(other, 'placements', 'whole')})"
        )
    return t.to_local()


class EMATeacher(nn.Module):
    """Frozen copies of student modules. `vision`: the image tower; `heads`: name -> head.

    Build it from the student's modules (`EMATeacher(vision, {"local_to_global": head, ...})`);
    pass the same modules to `copy_from` and `update`.
    """

    def __init__(self, vision: nn.Module, heads: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.vision = copy.deepcopy(vision)
        self.heads = nn.ModuleDict({k: copy.deepcopy(v) for k, v in (heads or {}).items()})
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # the teacher always runs in eval mode

    def _pairs(self, vision: nn.Module, heads: Mapping[str, nn.Module]) -> tuple[list, list]:
        teacher, student = [], []
        for t_mod, s_mod in [(self.vision, vision), *[(self.heads[k], heads[k]) for k in self.heads]]:
            t_params, s_params = list(t_mod.parameters()), list(s_mod.parameters())
            if len(t_params) != len(s_params):
                raise ValueError("teacher and student modules differ in structure")
            teacher += t_params
            student += s_params
        return [_local(t, s) for t, s in zip(teacher, student)], [_local(s, t) for t, s in zip(teacher, student)]

    @torch.no_grad()
    def copy_from(self, vision: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        """teacher = student (the switch: the teacher starts as the student)."""
        teacher, student = self._pairs(vision, heads)
        torch._foreach_copy_(teacher, [s.detach().to(t.dtype) for t, s in zip(teacher, student)])

    @torch.no_grad()
    def update(self, vision: nn.Module, heads: Mapping[str, nn.Module], momentum: float, tower: bool = True) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, with `_foreach` ops.
        `tower=False`: the heads only; the image tower stays as it is (a frozen teacher tower)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
        teacher, student = self._pairs(vision if tower else self.vision, heads)
        if not tower:  # the tower's pairs come first (`_pairs`); they are left out
            n = sum(1 for _ in self.vision.parameters())
            teacher, student = teacher[n:], student[n:]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, [s.detach().to(t.dtype) for t, s in zip(teacher, student)], alpha=1.0 - momentum)
