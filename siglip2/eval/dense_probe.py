"""Linear segmentation probe on frozen patch tokens: how SigLIP 2 judges its dense features.

Source: SigLIP 2 paper, Table 2 (ADE20k mIoU of a linear probe on frozen patch features;
B/16 37.6 -> 41.8 with self-distillation and masked prediction), which follows DINOv2's
linear probe (DINOv2 paper section 7.4; ``dinov2/eval/segmentation`` configs: a BatchNorm +
1x1-conv head on frozen patch tokens, logits upsampled bilinearly to the label resolution,
mmseg's mIoU). This is a small, CPU-friendly, deterministic version of that protocol:

- **Features**: ``model.encode_image(image=...).tokens`` (B, N, W), post-layernorm patch
  tokens on an h x w grid, row-major; the model is frozen (no gradient, eval mode).
- **Split**: by sample key alone, :func:`is_train_key`: a sample trains the probe when
  ``crc32(key) / 2**32 < train_fraction`` (default 0.5), else it is held out for scoring.
  The rule does not depend on shard order, rank count, loader workers or image caps, and a
  key that appears twice always lands on the same side.
- **Probe** (:class:`LinearProbe`): per-channel standardisation with the training tokens'
  mean and std (the frozen statistics of DINOv2's BatchNorm), then ``Linear(W, C)``,
  zero-initialised.
- **Training** (:func:`train_probe`): a fixed budget of ``steps`` AdamW steps, lr cosine to
  0, each on ``batch_images`` training images (all of them when fewer) taken in epochs of a
  permutation drawn from a ``torch.Generator`` seeded with ``seed``. Loss: cross-entropy of
  the per-patch logits upsampled **bilinearly** (``align_corners=False``, as
  ``F.interpolate``) to the label map at the model's input resolution (the mask resized
  there with nearest-neighbour), mean over labelled pixels. The upsampling is written as two
  fixed interpolation matrices (:func:`upsample_logits`), so training is free of the
  non-deterministic ``upsample_bilinear2d`` backward on GPU; under DDP every rank trains on
  the same gathered set and rank 0's weights are then broadcast.
- **Scoring**: per held-out image, logits upsampled bilinearly to the mask's **own**
  resolution (label resolution, as DINOv2 / mmseg; masks are never downsampled for
  scoring), argmax, one confusion matrix over all held-out pixels (summed over ranks).
  ``IoU_c = TP / (TP + FP + FN)``; **absent classes**: a class neither labelled nor
  predicted anywhere in the held-out set has no IoU (NaN) and is left out of the mean; a
  class predicted but never labelled scores 0 and counts (mmseg's ``nanmean``; the same as
  torchmetrics ``MulticlassJaccardIndex(average="macro")``).

Labels: class indices ``0..C-1``; :data:`IGNORE` (255) marks unlabelled pixels (excluded from
loss and score). :func:`labels_from_mask` turns a stored mask (value = class + 1, 0 =
background) into them.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, fields
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from siglip2 import distributed as dist_utils
from siglip2.eval.precision import tower_autocast

__all__ = [
    "IGNORE",
    "DenseProbeConfig",
    "LinearProbe",
    "is_train_key",
    "labels_from_mask",
    "resize_labels",
    "token_grid",
    "interpolation_matrix",
    "upsample_logits",
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "train_probe",
    "score_probe",
    "run_dense_probe",
]

log = logging.getLogger(__name__)

IGNORE = 255  # label value of unlabelled pixels: no loss, no score


@dataclass
class DenseProbeConfig:
    """The probe's budget; an eval yaml may override any field under ``probe:``.

    Defaults were set on the demo (tiny model, 8x8 tokens of width 128, 280 training and 220
    held-out images): 500 steps x 32 images at lr 0.3 come within ~0.01 mIoU of a 3000-step
    run (a linear probe on a small budget mostly underfits: lr 0.02 for 200 steps scored
    ~0.07 lower). The whole probe on that set takes ~9 s on 2 CPU cores (decode + tokens ~3 s,
    training ~5.5 s, scoring ~0.5 s).

    steps: AdamW steps (fixed budget; no early stopping, no validation-based selection).
    batch_images: training images per step (all of them when the training part is smaller).
    lr: peak AdamW learning rate on standardised tokens, cosine-decayed to 0 over ``steps``.
    weight_decay: torch AdamW's ``weight_decay`` (scaled by lr) on the Linear weight and bias.
    seed: seeds the generator that orders the training images.
    train_fraction: share of keys (by hash, :func:`is_train_key`) that train the probe.
    max_images: cap on the images read from the set, train and held-out together (None =
      all); each of ``world`` processes reads at most ``ceil(max_images / world)``, the first
      in its stream. Bounds the memory of the stored float32 tokens, ``max_images * N * W * 4``
      bytes (~16 MB for 500 demo images on the tiny model, ~1.2 GB for 1000 So400m/16 images
      at 256 px).
    """

    steps: int = 500
    batch_images: int = 32
    lr: float = 0.3
    weight_decay: float = 1e-4
    seed: int = 0
    train_fraction: float = 0.5
    max_images: int | None = 2000

    def __post_init__(self):
        if self.steps < 1 or self.batch_images < 1:
            raise ValueError(f"steps and batch_images must be >= 1, got {self.steps}, {self.batch_images}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if self.max_images is not None and self.max_images < 2:
            raise ValueError(f"max_images must be >= 2 or None, got {self.max_images}")

    @classmethod
    def from_dict(cls, spec: dict | None) -> "DenseProbeConfig":
        """Raises ValueError on an unknown key (a typo must not silently fall back to a default)."""
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown dense probe option(s) {unknown}; known: {sorted(known)}")
        return cls(**spec)


def is_train_key(key: str, train_fraction: float = 0.5) -> bool:
    """True when the sample with this key trains the probe: ``crc32(utf-8 key) / 2**32 < train_fraction``."""
    return zlib.crc32(str(key).encode("utf-8")) / 2**32 < train_fraction


def labels_from_mask(mask: np.ndarray, num_foreground: int, background: bool = True) -> np.ndarray:
    """Stored mask (uint8 (H, W): 0 = background, k = foreground class k-1) -> class indices.

    ``background=True``: value 0 is class 0 ("background", scored) and value k is class k
    (``num_foreground + 1`` classes). ``background=False``: value 0 is unlabelled (ADE20k's
    "other", mmseg ``reduce_zero_label``) and value k is class k-1 (``num_foreground``
    classes). Values above ``num_foreground`` become :data:`IGNORE`. Returns uint8 (H, W).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if not 0 < num_foreground < IGNORE:
        raise ValueError(f"num_foreground must be in [1, {IGNORE - 1}], got {num_foreground}")
    lut = np.full(256, IGNORE, dtype=np.uint8)
    if background:
        lut[: num_foreground + 1] = np.arange(num_foreground + 1)
    else:
        lut[1 : num_foreground + 1] = np.arange(num_foreground)
    return lut[mask.astype(np.uint8, copy=False)]


def resize_labels(labels: np.ndarray | torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(H, W) class indices -> uint8 (h, w) at ``size`` = (h, w), nearest neighbour at pixel
    centres (``nearest-exact``): labels are never blended."""
    t = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    if t.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {tuple(t.shape)}")
    out = F.interpolate(t[None, None].float(), size=tuple(int(s) for s in size), mode="nearest-exact")
    return out[0, 0].to(torch.uint8)


def token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) token grid of a square-patch ViT on a ``height`` x ``width`` pixel input with
    ``num_tokens`` tokens: (H // p, W // p) for the patch p that gives that many, a size that is
    not a multiple of the patch included (the released So400m/14 at 384 px: 27 x 27, its last
    6 px unseen; the probe's logits are stretched over the whole input, 1.6% there). The grid is
    unique: both sides only shrink as p grows. Raises ValueError when no patch gives it."""
    if num_tokens > 0:
        for p in range(1, min(height, width) + 1):
            h, w = height // p, width // p
            if h * w == num_tokens:
                return h, w
            if h * w < num_tokens:
                break
    raise ValueError(f"{num_tokens} tokens are not a square-patch grid of a {height}x{width} image")


def interpolation_matrix(n_out: int, n_in: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation, ``align_corners=False``, no antialias:
    the separable factor of ``F.interpolate(mode="bilinear", align_corners=False)``."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]  # (1, n_in channels, n_in samples)
    m = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]  # (n_in, n_out)
    return m.t().contiguous().to(device=device, dtype=dtype)


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) logits -> (B, C, H, W) at ``size`` = (H, W): bilinear, ``align_corners=False``
    (``F.interpolate``'s result to float rounding), as two matmuls with a deterministic backward."""
    a_h = interpolation_matrix(int(size[0]), logits.shape[-2], logits.device, logits.dtype)
    a_w = interpolation_matrix(int(size[1]), logits.shape[-1], logits.device, logits.dtype)
    return a_h @ logits @ a_w.t()


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE
) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted; pixels whose target is
    ``ignore_index`` (or outside ``0..C-1``) are left out. ``pred``, ``target``: same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + p[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confmat: torch.Tensor) -> torch.Tensor:
    """(C,) float64 ``TP / (TP + FP + FN)``; NaN for a class neither labelled nor predicted."""
    cm = confmat.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(confmat: torch.Tensor) -> float:
    """Mean IoU over the classes present (labelled or predicted; NaN ones left out). NaN if none."""
    iou = iou_per_class(confmat)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


class LinearProbe(nn.Module):
    """Standardise each channel with fixed training statistics, then ``Linear(W, C)``.

    ``forward``: (..., W) tokens -> (..., C) logits.
    """

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.linear = nn.Linear(width, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear((tokens.float() - self.mean) / self.std)


def train_probe(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    grid: Sequence[int],
    num_classes: int,
    config: DenseProbeConfig | None = None,
) -> LinearProbe:
    """Fit a :class:`LinearProbe` on frozen tokens (see the module doc for the protocol).

    tokens: (n, N, W) with N = h * w row-major; labels: (n, H, W) class indices (:data:`IGNORE`
    = unlabelled) at the label resolution the logits are upsampled to; grid: (h, w).
    Runs on ``tokens.device``; the result is in eval mode. Raises ValueError on empty input,
    mismatched shapes, or no labelled pixel.
    """
    cfg = config or DenseProbeConfig()
    n, num_tokens, width = tokens.shape
    h, w = int(grid[0]), int(grid[1])
    if n == 0:
        raise ValueError("train_probe needs at least one training image")
    if h * w != num_tokens or labels.ndim != 3 or labels.shape[0] != n:
        raise ValueError(f"tokens {tuple(tokens.shape)}, grid {(h, w)} and labels {tuple(labels.shape)} disagree")
    labels = labels.to(tokens.device).long()
    if not ((labels != IGNORE) & (labels < num_classes)).any():
        raise ValueError("no labelled pixel to train the probe on")
    labels = torch.where(labels < num_classes, labels, torch.full_like(labels, IGNORE))
    probe = LinearProbe(width, num_classes).to(tokens.device)
    flat = tokens.reshape(-1, width).float()
    probe.mean.copy_(flat.mean(0))
    probe.std.copy_(flat.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.AdamW(probe.linear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    bs = min(cfg.batch_images, n)
    order, pos = torch.randperm(n, generator=gen), 0
    size = tuple(labels.shape[1:])
    probe.train()
    for _ in range(cfg.steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + bs].to(tokens.device)
        pos += bs
        logits = probe(tokens[idx]).reshape(bs, h, w, num_classes).permute(0, 3, 1, 2)
        loss = F.cross_entropy(upsample_logits(logits, size), labels[idx], ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


@torch.no_grad()
def score_probe(
    probe: LinearProbe,
    tokens: torch.Tensor,
    grid: Sequence[int],
    masks: Sequence[np.ndarray | torch.Tensor],
    num_classes: int,
) -> torch.Tensor:
    """Confusion matrix (C, C) of the probe on held-out images.

    tokens: (n, N, W); masks: n class-index maps (H_i, W_i), each at its own resolution: the
    logits are upsampled bilinearly (``align_corners=False``) to each mask's size.
    """
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=tokens.device)
    if tokens.shape[0] != len(masks):
        raise ValueError(f"{tokens.shape[0]} token sets but {len(masks)} masks")
    if tokens.shape[0] == 0:
        return cm
    h, w = int(grid[0]), int(grid[1])
    logits = probe(tokens).reshape(-1, h, w, num_classes).permute(0, 3, 1, 2)  # (n, C, h, w)
    for i, mask in enumerate(masks):
        target = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask, device=tokens.device)
        up = F.interpolate(logits[i : i + 1], size=tuple(target.shape), mode="bilinear", align_corners=False)
        cm += confusion_matrix(up[0].argmax(0), target, num_classes)
    return cm


@torch.no_grad()
def _collect(model, batches: Iterable[dict], device, cfg: DenseProbeConfig):
    """Tokens of every image read (capped at ``max_images`` per process), split by key.

    Returns (shape, train tokens, train labels, held-out tokens, held-out masks), where shape
    = (h, w, H, W, W_tokens) of this process's input, None when it read no image."""
    world = dist_utils.get_world_size() if dist_utils.is_distributed() else 1
    cap = None if cfg.max_images is None else math.ceil(cfg.max_images / world)
    train_tok, train_lab, test_tok, test_masks = [], [], [], []
    shape, seen = None, 0
    for batch in batches:
        if cap is not None and seen >= cap:
            break
        image = batch["image"]
        take = image.shape[0] if cap is None else min(image.shape[0], cap - seen)
        seen += take
        with tower_autocast(device):  # bf16 on CUDA, fp32 on CPU (siglip2.eval.precision)
            out = model.encode_image(image=image[:take].to(device))
        if out.token_mask is not None and not bool(out.token_mask.all()):
            raise ValueError("the dense probe needs fixed-grid tokens (no padding)")
        tokens = out.tokens.float()
        h, w = token_grid(tokens.shape[1], image.shape[-2], image.shape[-1])
        shape = (h, w, int(image.shape[-2]), int(image.shape[-1]), int(tokens.shape[-1]))
        for i in range(take):
            if is_train_key(batch["key"][i], cfg.train_fraction):
                train_tok.append(tokens[i])
                train_lab.append(torch.as_tensor(batch["seg_small"][i]))
            else:
                test_tok.append(tokens[i])
                test_masks.append(batch["seg"][i])
    return shape, train_tok, train_lab, test_tok, test_masks


def run_dense_probe(
    model: nn.Module,
    batches: Iterable[dict],
    num_classes: int,
    device: torch.device | str = "cpu",
    config: DenseProbeConfig | None = None,
) -> dict[str, Any]:
    """Extract frozen tokens, train the probe on the training keys, score the held-out ones.

    ``batches``: dicts with ``image`` (B, 3, H, W) model input, ``key`` (B strings), ``seg_small``
    (B, H, W) uint8 class indices at the input resolution (training targets) and ``seg`` (B
    arrays (H_i, W_i), class indices at the mask's own resolution, scoring targets), as
    :class:`siglip2.eval.suite.EvalSample` makes them. The model runs in eval mode without
    gradient (its mode is restored after). DDP: each rank reads its own images; training
    images are gathered so every rank fits the same probe (rank 0's weights are broadcast).

    Returns ``{"miou", "pixel_acc" (both in [0, 1]), "iou" (C,) float64 with NaN for absent
    classes, "num_train_images", "num_test_images", "seconds" (wall time of the whole
    probe)}``, or ``{}`` (with a warning) when the training or the held-out part is empty.
    Raises ValueError when the tokens are not a fixed square-patch grid of the input.
    """
    cfg = config or DenseProbeConfig()
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        shape, train_tok, train_lab, test_tok, test_masks = _collect(model, batches, device, cfg)
    finally:
        model.train(was_training)
    shapes = {s for s in dist_utils.all_gather_object(shape) if s is not None}
    if len(shapes) > 1:
        raise ValueError(f"ranks disagree on the (grid, input size, width): {sorted(shapes)}")
    counts = dist_utils.all_reduce_sum(torch.tensor([len(train_tok), len(test_tok)], device=device))
    n_train, n_test = int(counts[0]), int(counts[1])
    if n_train == 0 or n_test == 0:
        log.warning("dense probe skipped: %d training and %d held-out images", n_train, n_test)
        return {}
    h, w, height, width, channels = shapes.pop()
    tok = torch.stack(train_tok) if train_tok else torch.zeros(0, h * w, channels, device=device)
    lab = (
        torch.stack(train_lab).to(device)
        if train_lab
        else torch.zeros(0, height, width, dtype=torch.uint8, device=device)
    )
    tok, lab = dist_utils.all_gather_variable(tok), dist_utils.all_gather_variable(lab)
    with torch.enable_grad():
        probe = train_probe(tok, lab, (h, w), num_classes, cfg)
    if dist_utils.is_distributed():
        for t in probe.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    test = torch.stack(test_tok) if test_tok else torch.zeros(0, h * w, channels, device=device)
    cm = dist_utils.all_reduce_sum(score_probe(probe, test, (h, w), test_masks, num_classes)).cpu()
    return {
        "miou": mean_iou(cm),
        "pixel_acc": float(cm.diag().sum()) / max(int(cm.sum()), 1),
        "iou": iou_per_class(cm),
        "num_train_images": n_train,
        "num_test_images": n_test,
        "seconds": time.perf_counter() - start,
    }
