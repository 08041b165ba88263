"""The optimiser's settings and parameter groups (big_vision's AdamW with decoupled decay).

`OptimConfig` is the `optim:` block of `conf/train.yaml`, typed; its defaults are the
yaml's (a test keeps them equal). Peak lr and warmup are not published for SigLIP 2
(RECIPE.md); the demo's values and how they were chosen are in docs/results.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


IMPLS = ("auto", "fused", "foreach", "loop")


@dataclass
class OptimConfig:
    """lr: peak learning rate. weight_decay: decoupled decay per step at peak (big_vision /
    the paper: 1e-4), independent of lr; torch AdamW gets weight_decay / lr. warmup_steps:
    optimiser steps (int) or a fraction of the recipe (float < 1). min_lr_ratio: the cosine's
    end as a fraction of the peak. impl: AdamW kernel, "auto" | "fused" | "foreach" | "loop".
    grad_clip: global gradient-norm clip (Lightning's gradient_clip_val)."""

    lr: float = 3.5e-4
    weight_decay: float = 1.0e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    warmup_steps: float | int = 0.05
    min_lr_ratio: float = 0.0
    impl: str = "auto"
    grad_clip: float = 1.0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")
        if self.impl not in IMPLS:
            raise ValueError(f"optim.impl must be auto, fused, foreach or loop, got {self.impl!r}")
        if self.lr < 0 or self.weight_decay < 0:
            raise ValueError(f"optim.lr and optim.weight_decay must be >= 0, got {self.lr}, {self.weight_decay}")

    @property
    def torch_weight_decay(self) -> float:
        """torch AdamW multiplies its decay by lr; the recipe's decay is decoupled from it."""
        return float(self.weight_decay) / float(self.lr) if self.lr > 0 else 0.0


def adamw_impl(impl: str, trainer: Any = None) -> str:
    """`optim.impl`: "fused", "foreach" or "loop", or "auto" = fused where Lightning can clip
    the gradients of a fused optimiser, else foreach. `trainer`: anything with the Trainer's
    `precision` and `strategy` (read by name; no Lightning import here).

    Fused AdamW updates each tensor in one pass; on CPU it is several times faster than
    foreach, which falls back to one kernel per tensor per operation (benchmarks/RESULTS.md).
    Lightning refuses gradient clipping for fused optimisers under mixed precision (they may
    unscale inside `step`), and DeepSpeed and FSDP own the optimiser step and the clipping, so
    those runs keep foreach.
    """
    if impl not in IMPLS:
        raise ValueError(f"optim.impl must be auto, fused, foreach or loop, got {impl!r}")
    if impl != "auto":
        return impl
    precision = str(getattr(trainer, "precision", "32-true"))
    strategy = type(getattr(trainer, "strategy", None)).__name__.lower()
    if "mixed" in precision or "deepspeed" in strategy or "fsdp" in strategy:
        return "foreach"
    return "fused"


def no_decay(name: str, param: nn.Parameter, ndim: int | None = None) -> bool:
    """Biases, norms, token/position embeddings, the MAP probe, mask tokens and the logit
    scale/bias are not decayed; the patch embedding is a Linear layer and is decayed like the
    other weights (big_vision's default decay mask: matrices only). `ndim`: the parameter's
    original number of dimensions when `param` is a flattened shard (FSDP1 hands the optimiser
    1-D views), else `param.ndim`."""
    if (param.ndim if ndim is None else ndim) <= 1:  # biases, LayerNorm weights, logit_scale/bias
        return True
    lowered = name.lower()
    return any(key in lowered for key in ("token_embedding", "position_embedding", "probe", "norm", "mask_token"))


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr: float | None = None,
    lr_mults: Mapping[str, float] | None = None,
    ndims: Mapping[str, int] | None = None,
    gates: Iterable[str] = (),
) -> list[dict]:
    """AdamW groups from `named_parameters()` (trainable only; names as in the unwrapped
    module): decayed params with `weight_decay`, the rest with 0; parameters under a prefix of
    `lr_mults` (`{"losses.masked.": 0.5}`) get groups of their own with `lr * mult` (the
    schedule multiplies every group's lr). `ndims`: name -> original ndim, for parameters that
    are flattened shards now (see `no_decay`); a name missing from it is a `KeyError`.
    `gates`: name prefixes whose parameters get groups of their own, tagged `group["gate"] =
    prefix` (the longest prefix that matches), so that a caller can stop their updates by
    setting the group's lr to 0 (dormant losses, frozen prototypes: sharded optimisers cannot
    see `grad = None`)."""
    lr_mults = {k: float(v) for k, v in (lr_mults or {}).items() if float(v) != 1.0}
    if lr_mults and lr is None:
        raise ValueError("lr multipliers need the peak lr")
    gates = sorted(gates, key=len, reverse=True)
    groups: dict[tuple[bool, float, str | None], list[nn.Parameter]] = {(True, 1.0, None): [], (False, 1.0, None): []}
    for name, param in named:
        if not param.requires_grad:
            continue
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        gate = next((g for g in gates if name.startswith(g)), None)
        decayed = not no_decay(name, param, None if ndims is None else ndims[name])
        groups.setdefault((decayed, mult, gate), []).append(param)
    out = []
    for (decayed, mult, gate), params in groups.items():
        if not params and gate is not None:
            continue
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if mult != 1.0:
            group["lr"] = lr * mult
        if gate is not None:
            group["gate"] = gate
        out.append(group)
    return out
