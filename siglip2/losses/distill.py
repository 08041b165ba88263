"""Self-distillation losses of SigLIP 2 [P §2.3]: local-to-global (SILC) and masked
prediction (TIPS), both DINO-style: the student's projected features are matched by
cross-entropy to the centred, sharpened softmax of an EMA teacher's.

    q = softmax((g_t(teacher) - c) / tau_t),   L = -sum_k q_k log softmax(g_s(student) / tau_s)_k

Local-to-global: the teacher's MAP-pooled feature of one global view against the student's
pooled features of 8 local views (mean over views and images). Masked prediction: the
student sees the global view with 50% of its patch embeddings replaced by a mask token; its
patch tokens at the masked positions (gathered before the head: full tokens x prototypes
logits would not fit) are matched to the teacher's tokens of the unmasked view at the same
positions; mean over an image's masked patches, then over images (DINOv2
`iBOTPatchLoss.forward_masked`).

None of this was published for SigLIP 2 (RECIPE.md): head shape, prototypes, temperatures,
centring and its momentum come from DINO / iBOT / DINOv2 and are config keys
(`LocalToGlobalConfig`, `MaskedPredictionConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from siglip2.distributed import all_reduce_sum
from siglip2.schedule import LossTiming

__all__ = [
    "DINOHead",
    "DistillConfig",
    "LocalToGlobalConfig",
    "MaskedPredictionConfig",
    "LocalToGlobalLoss",
    "MaskedPredictionLoss",
    "teacher_temperature",
    "sinkhorn_knopp",
]


class DINOHead(nn.Module):
    """DINO projection head: `nlayers` Linear+GELU layers (the last to `bottleneck_dim`), L2
    normalisation, then a weight-normalised prototype layer without bias whose norm is fixed
    at 1 (DINO's `norm_last_layer=True`): logits = normalize(x) @ normalize(V)^T.

    (N, in_dim) -> (N, out_dim). Init: truncated normal std 0.02, zero biases (DINO).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return x @ F.normalize(self.prototypes, dim=-1).t()


@dataclass
class DistillConfig(LossTiming):
    """Shared keys of the two distillation losses (defaults from DINO/iBOT/DINOv2; RECIPE.md).

    weight x size_factor is the loss's weight (the paper: 1.0 and 0.25 times B 0.25, L 0.5,
    So400m 1.0, g 0.5). teacher_temp rises linearly to teacher_temp_final over the first
    teacher_temp_warmup of the loss's phase. centering: "centering" (DINO, EMA momentum
    center_momentum) or "sinkhorn_knopp" (DINOv2, sk_iterations). head_lr_mult: the heads' and
    mask token's lr relative to the peak (they join at ~9.5% of it). freeze_prototypes: the
    prototype layer gets no update for this fraction of the phase (DINO's first epoch).
    """

    start_frac: float = 0.8
    size_factor: float = 1.0
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_final: float = 0.04
    teacher_temp_warmup: float = 0.0
    centering: str = "centering"
    center_momentum: float = 0.9
    sk_iterations: int = 3
    head_lr_mult: float = 1.0
    freeze_prototypes: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")

    @property
    def effective_weight(self) -> float:
        return float(self.weight) * float(self.size_factor)


@dataclass
class LocalToGlobalConfig(DistillConfig):
    """`stage.losses.local_to_global` (SILC): weight 1.0 x size factor, 65536 prototypes; the
    views (8 local crops) are `siglip2.data.views.ViewConfig`'s."""


@dataclass
class MaskedPredictionConfig(DistillConfig):
    """`stage.losses.masked` (TIPS): weight 0.25 x size factor, 8192 prototypes (iBOT), teacher
    temperature 0.04 -> 0.07 over the first 30% of the phase; the mask (50% of patches,
    uniform) is `siglip2.data.views.ViewConfig.mask_ratio`."""

    weight: float = 0.25
    out_dim: int = 8192
    teacher_temp_final: float = 0.07
    teacher_temp_warmup: float = 0.3


def teacher_temperature(cfg: DistillConfig, progress: float) -> float:
    """Teacher temperature at recipe `progress`: linear from teacher_temp at start_frac to
    teacher_temp_final after teacher_temp_warmup of the phase [start_frac, end_frac]."""
    span = (cfg.end_frac - cfg.start_frac) * cfg.teacher_temp_warmup
    if span <= 0:
        return float(cfg.teacher_temp_final if progress >= cfg.start_frac else cfg.teacher_temp)
    t = min(1.0, max(0.0, (progress - cfg.start_frac) / span))
    return float(cfg.teacher_temp + t * (cfg.teacher_temp_final - cfg.teacher_temp))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """(N, K) logits -> (N, K) targets whose prototypes are used equally over the global batch
    (DINOv2 `SinkhornKnoppTeacher`); sums are all-reduced over ranks."""
    q = torch.exp(teacher_logits.float() / temp).t()  # (K, N)
    n = torch.tensor(float(q.shape[1]), device=q.device)
    n = all_reduce_sum(n)
    k = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    q *= n
    return q.t()


class _DINOTarget(nn.Module):
    """The teacher side: centring (or Sinkhorn-Knopp) and its centre."""

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        t = teacher_logits.float()
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(t, temp, self.cfg.sk_iterations)
        return F.softmax((t - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """center = m * center + (1 - m) * mean of this step's teacher logits over all ranks."""
        t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        total = all_reduce_sum(torch.cat([t.sum(0), t.new_tensor([t.shape[0]])]))
        mean = total[:-1] / total[-1].clamp_min(1.0)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(mean[None], alpha=1.0 - m)

    @torch.no_grad()
    def metrics(self, q: torch.Tensor, student_logits: torch.Tensor, temp: float, prefix: str) -> dict:
        entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
        center = F.softmax(self.center / temp, dim=-1)
        center_entropy = -(center * center.clamp_min(1e-12).log()).sum(-1).mean()
        return {
            f"{prefix}/teacher_entropy": entropy,
            f"{prefix}/center_entropy": center_entropy,
            f"{prefix}/agreement": (q.argmax(-1) == student_logits.argmax(-1)).float().mean(),
            f"{prefix}/teacher_temp": torch.tensor(temp),
            f"{prefix}/max_entropy": torch.tensor(math.log(q.shape[-1])),
        }


def _cross_entropy(q: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row -sum_k q_k log softmax(s / tau_s)_k, (..., K) -> (...)."""
    return -(q * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


class LocalToGlobalLoss(nn.Module):
    """SILC's local-to-global loss. forward(student_pooled (V, B, W) of the V local views,
    teacher_logits (B, K) = teacher head on the global view's pooled feature, teacher_temp)
    -> (mean over views and images of the cross-entropy, metrics). Updates the centre."""

    def __init__(self, cfg: LocalToGlobalConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.head = DINOHead(width, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers)
        self.target = _DINOTarget(cfg)

    def forward(self, student_pooled: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float):
        v, b, w = student_pooled.shape
        s = self.head(student_pooled.reshape(v * b, w)).reshape(v, b, -1)
        q = self.target.targets(teacher_logits, teacher_temp)
        loss = _cross_entropy(q[None], s, self.cfg.student_temp).mean()
        metrics = {
            "distill/local_to_global": loss.detach(),
            **self.target.metrics(q, s[0].detach(), teacher_temp, "distill/l2g"),
        }
        if self.training:
            self.target.update_center(teacher_logits)
        return loss, metrics


class MaskedPredictionLoss(nn.Module):
    """TIPS's masked prediction loss and the mask token.

    forward(student_tokens (M, W) = the student's patch tokens at the M masked positions of
    the batch, teacher_logits (M, K) = the teacher head on the unmasked view's tokens at the
    same positions, image_index (M,) = which image each position belongs to, batch_size B,
    teacher_temp) -> (mean over each image's masked patches, then over the B images, metrics).
    `mask_token` (W,) replaces masked patch embeddings before the position embedding
    (zero-initialised, DINOv2).
    """

    def __init__(self, cfg: MaskedPredictionConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.head = DINOHead(width, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers)
        self.target = _DINOTarget(cfg)
        self.mask_token = nn.Parameter(torch.zeros(width))

    def forward(
        self,
        student_tokens: torch.Tensor,
        teacher_logits: torch.Tensor,
        image_index: torch.Tensor,
        batch_size: int,
        teacher_temp: float,
    ):
        s = self.head(student_tokens)
        q = self.target.targets(teacher_logits, teacher_temp)
        per_token = _cross_entropy(q, s, self.cfg.student_temp)
        # masked patches per image, without bincount (a host sync: its output size is data-dependent)
        counts = per_token.new_zeros(batch_size).index_add_(0, image_index, torch.ones_like(per_token)).clamp_min(1)
        loss = (per_token / counts[image_index]).sum() / batch_size
        metrics = {
            "distill/masked": loss.detach(),
            **self.target.metrics(q, s.detach(), teacher_temp, "distill/masked"),
        }
        if self.training:
            self.target.update_center(teacher_logits)
        return loss, metrics
