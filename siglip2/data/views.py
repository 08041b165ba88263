"""The augmented views of SigLIP 2's self-distillation, cut on the device inside the step.

SigLIP 2 (arXiv 2502.14786 §2.3) adds, at 80% of training, a local-to-global loss (SILC: the
EMA teacher sees 1 global view, the student 8 local views) and a masked-prediction loss
(TIPS: the student sees the same global view with 50% of its patch embeddings replaced by a
mask token). The sigmoid and LocCa losses keep the original image. The paper: the local views are
"trained to match the teacher's representation, derived from the full image", and the masked
student sees the teacher's image, so the global view is by default the whole training image
(``global_scale=None``; flipped and colour-jittered as DINO's global views), not DINO's
(0.4, 1) crop (RECIPE.md's researched default, kept as an option). Local views are cut from
the batch's image, the only copy the loader delivers: at the training resolution (64 px on the
demo, 256 px for B/16 at 256), so a (0.05, 0.4) local crop is upsampled to ``local_size``.
No code for the views was published; the rest follows DINO's ``DataAugmentationDINO``
(facebookresearch/dino ``main_dino.py``) as RECIPE.md says:

=====================  ==============================================  =====================
                        DINO                                            here
=====================  ==============================================  =====================
global crop            RandomResizedCrop(224, (0.4, 1), bicubic)       **none**: the full
                                                                       training image (the
                                                                       paper; (0.4, 1) an
                                                                       option), bilinear
local crops            8 x RandomResizedCrop(96, (0.05, 0.4))          same (96 px for /16)
flip                   RandomHorizontalFlip(0.5)                       same, per sample
colour                 RandomApply(ColorJitter(.4, .4, .2, .1), .8),   same, per sample,
                       RandomGrayscale(.2)                             random op order
blur / solarize        GaussianBlur (1.0 / 0.1 / 0.5), Solarization    **left out** (SigLIP
                       (0.2, 2nd global)                               2 names flips and
                                                                       colour jitter only)
=====================  ==============================================  =====================

Everything works on the batch's ``image`` (B, 3, H, W) float in [-1, 1] (the model's input
range), batched (no Python loop over samples for pixel work; the jitter's random order is
per-sample masks over fixed slots), on whatever device the images are on, so switching
the losses on never restarts the data loaders (DESIGN.md, "Data flow"). All randomness
comes from a ``torch.Generator`` passed in: small parameter tensors (boxes, flags, factors,
mask noise) are drawn on the generator's device and then moved to the images' device, so a
CPU generator gives the same views on CPU and GPU, and saving ``generator.get_state()`` in
the checkpoint makes a resumed run draw the same views. The draw order of each function is
fixed (documented per function).

Crops and resizing use ``torchvision.ops.roi_align(aligned=True)``: one call for all the
boxes of a batch. Measured against ``torchvision.transforms.v2.functional.resized_crop``
(bilinear, half-pixel centres) on integer boxes, ``sampling_ratio=1`` is the same bilinear
resize (max difference ~1e-7 on [-1, 1] images) except on the outermost output rows and
columns when *upsampling* a crop that does not touch the image border: resized_crop cuts
first and clamps its samples to the crop's edge pixels, roi_align interpolates with the
image pixels just outside the box (what resizing the whole image and then cutting would
give; up to 0.5 on a noise image). Neither antialiases. The default here is
``sampling_ratio=-1``, roi_align's adaptive rule: ceil(box side / output side) bilinear
samples per output bin along each axis, averaged (a box filter). It is identical to
``sampling_ratio=1`` when the crop is upsampled (all global views at the training resolution,
local views of <= 96 px crops) and, when downscaling, closer to ``resized_crop(antialias=True)``
than plain bilinear. Mean |difference| to antialias=True over downscaled crops, on [-1, 1]
images, plain bilinear -> adaptive: recipe locals (256 px image, scale (0.05, 0.4), 96 px)
0.0033 -> 0.0015 on demo scenes, 0.103 -> 0.033 on uniform noise; demo locals (64 px image,
32 px views) 0.0046 -> 0.0032 and 0.051 -> 0.029 (the crops there shrink at most 1.26x).

Local views are returned **view-major**, flattened: row ``v * B + b`` is local view ``v`` of
image ``b``, so ``local.unflatten(0, (n, B))`` gives (n, B, 3, s, s) and the student's output
(n*B, D) chunks into n views each aligned with the teacher's (B, D) global output, as DINO's
multi-crop loss expects (``student_output.chunk(ncrops)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import roi_align

__all__ = [
    "ViewConfig",
    "DistillViews",
    "random_resized_crop_boxes",
    "crop_resize",
    "random_hflip",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "color_jitter",
    "global_view",
    "local_views",
    "mask_count",
    "random_patch_mask",
    "make_views",
]

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale (and PIL's "L" mode)
_LUMA = (0.2989, 0.587, 0.114)


@dataclasses.dataclass
class ViewConfig:
    """Settings of the distillation views: the paper's full-image global view, and DINO's local
    crops and colour (RECIPE.md, ../shared beside the repository).

    ``global_size``: side of the global view in pixels; ``None`` = the batch's image size
    (the training resolution, as SigLIP 2). ``global_scale``: ``None`` = the full image (the
    paper: the teacher's representation is "derived from the full image"), or (low, high) for
    DINO's random-resized crop of that area fraction, e.g. (0.4, 1.0). ``local_scale``: the
    local crops' area as a fraction of the image, drawn uniformly. ``ratio``: crop aspect (w/h) range, drawn
    log-uniformly. ``local_size``: 96 px gives 6x6 tokens for patch 16 (84 px for /14); the
    tiny demo model (64 px, patch 8) uses 24 px local views (3x3 tokens): its model
    config sets that (``distill.local_grid``). ``brightness``, ``contrast``, ``saturation``,
    ``hue``: ColorJitter strengths (factors uniform in [max(0, 1 - s), 1 + s], hue shift uniform in [-hue, hue]; 0 turns one
    off), applied with probability ``jitter_p``, then grayscale with ``grayscale_p``.
    ``mask_ratio``: fraction of the global view's patches masked for the student, exactly
    ``round(mask_ratio * N)`` per image. ``sampling_ratio``: roi_align's samples per output
    bin and axis; <= 0 is adaptive (ceil(crop side / output side)), 1 plain bilinear.
    """

    global_size: int | None = None
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_count: int = 8
    local_size: int = 96
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    mask_ratio: float = 0.5
    sampling_ratio: int = -1

    def __post_init__(self):
        # yaml gives lists; keep tuples so configs compare and hash the same
        for name in ("global_scale", "local_scale", "ratio"):
            if name == "global_scale" and self.global_scale is None:
                continue
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"ViewConfig.{name} must be (low, high) with 0 < low <= high, got {value}")
            setattr(self, name, value)
        if (self.global_scale is not None and self.global_scale[1] > 1) or self.local_scale[1] > 1:
            raise ValueError("crop scales are area fractions of the image: at most 1")
        for name in ("flip_p", "jitter_p", "grayscale_p", "mask_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ViewConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ViewConfig.hue must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("ColorJitter strengths must be >= 0")
        if self.local_count < 0 or self.local_size < 1:
            raise ValueError("local_count must be >= 0 and local_size >= 1")


class DistillViews(NamedTuple):
    """What :func:`make_views` cuts for one step (pixel boxes are in the source image)."""

    global_view: torch.Tensor  # (B, 3, G, G) float32 in [-1, 1]: teacher input, and student input with `mask`
    local_views: torch.Tensor  # (n*B, 3, s, s) float32 in [-1, 1], view-major (row v*B + b)
    mask: torch.Tensor  # (B, N) bool, N = (G/p)^2 patches of the global view, row-major (y, x)
    global_boxes: torch.Tensor  # (B, 4) x1, y1, x2, y2 pixel edges
    local_boxes: torch.Tensor  # (n*B, 4), view-major like local_views
    global_flip: torch.Tensor  # (B,) bool: flipped horizontally after the crop
    local_flip: torch.Tensor  # (n*B,) bool

    def masked_positions(self, ratio: float) -> torch.Tensor:
        """(B, K) long: each image's masked patch positions, ascending, K = ``mask_count(N,
        ratio)`` (every row of a `random_patch_mask` has exactly K). Row-major, it lists what
        ``mask.nonzero()`` lists, in the same order, with a shape the host knows: gathering
        with it needs no host sync (``nonzero`` waits for the device to learn its size)."""
        k = mask_count(self.mask.shape[1], ratio)
        # stable sort of 0 (masked) before 1: the masked positions first, each group ascending
        return (~self.mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]


# ---------------------------------------------------------------------------------------------
# randomness


def _rand(*shape: int, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) float32 drawn on the generator's device (CPU when None: the default one)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(*shape, generator=generator, device=device)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------
# geometry


def random_resized_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """(batch_size, 4) float32 crop boxes ``x1, y1, x2, y2`` in pixel edges (integer valued).

    torchvision's ``RandomResizedCrop.get_params`` rule, vectorised: for each sample,
    ``attempts`` (10, as torchvision) candidates draw an area fraction uniformly from
    ``scale`` and an aspect ratio w/h log-uniformly from ``ratio``; ``w = round(sqrt(A * r))``,
    ``h = round(sqrt(A / r))`` (round half to even, as Python's round); the first candidate that
    fits (0 < w <= width, 0 < h <= height) is placed uniformly at an integer offset. A sample
    with no fitting candidate gets torchvision's fallback: the central crop of the whole image
    clipped to the nearest aspect in ``ratio``.

    Draws, in order, on the generator's device: (batch_size, attempts, 2) uniforms (area,
    aspect), then (batch_size, 2) uniforms (y offset, x offset). Returned on that device.
    """
    lo, hi = float(scale[0]), float(scale[1])
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    u = _rand(batch_size, attempts, 2, generator=generator).double()
    off = _rand(batch_size, 2, generator=generator).double()
    area = height * width * (lo + (hi - lo) * u[..., 0])
    aspect = torch.exp(log_r0 + (log_r1 - log_r0) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True (0 when none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = ok.any(dim=1)

    # torchvision's fallback: whole image, clipped to the aspect range, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # randint(0, H - h + 1) as floor(u * (H - h + 1)); the clamp guards u*n rounding up to n
    y = torch.minimum(torch.floor(off[:, 0] * (height - h + 1)), height - h)
    x = torch.minimum(torch.floor(off[:, 1] * (width - w + 1)), width - w)
    y = torch.where(found, y, torch.full_like(y, (height - fh) // 2))
    x = torch.where(found, x, torch.full_like(x, (width - fw) // 2))
    return torch.stack([x, y, x + w, y + h], dim=1).float()


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, size: int | Sequence[int], sampling_ratio: int = -1
) -> torch.Tensor:
    """Cut every box out of its image and resize it to ``size``: (K, C, h, w), one batched op.

    ``images`` (B, C, H, W) float; ``boxes`` either (B, 4) ``x1, y1, x2, y2`` in pixel edges
    (box i from image i) or (K, 5) ``batch_index, x1, y1, x2, y2`` (any number per image), on
    any device. ``torchvision.ops.roi_align(aligned=True, spatial_scale=1)``: output pixel
    (i, j) averages ``sampling_ratio`` x ``sampling_ratio`` bilinear samples spread evenly over
    its bin (the box divided into h x w bins, pixel centres at k + 0.5); <= 0 is adaptive,
    ceil(box side / output side) per axis and per box. With 1 sample per bin this is bilinear
    resizing with half-pixel centres (``resized_crop(antialias=False)``) except at the border
    when upsampling (see the module docstring); it does not antialias, the adaptive rule
    approximates it with a box filter. Samples beyond the image border clamp to the edge
    pixel (within one pixel; boxes should lie inside the image).
    """
    if boxes.shape[-1] == 4:
        if boxes.shape[0] != images.shape[0]:
            raise ValueError(f"(B, 4) boxes need one box per image: {boxes.shape[0]} boxes, {images.shape[0]} images")
        index = torch.arange(images.shape[0], device=boxes.device, dtype=boxes.dtype)
        boxes = torch.cat([index[:, None], boxes], dim=1)
    elif boxes.shape[-1] != 5:
        raise ValueError(f"boxes must be (B, 4) or (K, 5), got {tuple(boxes.shape)}")
    rois = boxes.to(device=images.device, dtype=images.dtype, non_blocking=True)
    return roi_align(
        images, rois, output_size=_hw(size), spatial_scale=1.0, sampling_ratio=int(sampling_ratio), aligned=True
    )


def random_hflip(
    images: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each image left-right with probability ``p``: (images, (B,) bool flags).

    Draws (B,) uniforms.
    """
    flip = _rand(images.shape[0], generator=generator) < p
    flip_dev = flip.to(images.device, non_blocking=True)
    return torch.where(flip_dev[:, None, None, None], images.flip(-1), images), flip


# ---------------------------------------------------------------------------------------------
# colour, in [0, 1] space, per-sample factors (B,) -- torchvision.transforms.v2.functional's
# formulas on float images, batched


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma 0.2989 R + 0.587 G + 0.114 B (torchvision's)."""
    r, g, b = images.unbind(dim=-3)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(-3)


def _per_sample(factor: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(factor, dtype=images.dtype, device=images.device)
    return f.reshape(-1, 1, 1, 1) if f.ndim else f


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor + other * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """x * f, clamped to [0, 1] (torchvision ``adjust_brightness``); ``factor`` scalar or (B,)."""
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with the image's mean luma: f x + (1 - f) mean(gray(x)), clamped (torchvision)."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, _per_sample(factor, images))


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with the per-pixel luma: f x + (1 - f) gray(x), clamped (torchvision)."""
    return _blend(images, rgb_to_grayscale(images), _per_sample(factor, images))


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=-3)
    maxc, minc = images.amax(dim=-3), images.amin(dim=-3)
    delta = maxc - minc
    gray = delta == 0
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(gray, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    # PIL / torchvision priority on ties: red, then green, then blue
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray, torch.zeros_like(h), (h / 6.0).remainder(1.0))
    return torch.stack([h, s, maxc], dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    # the continuous form of the six-sector formula: channel n in (R 5, G 3, B 1) is
    # v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6
    h, s, v = hsv.unbind(dim=-3)
    n = torch.arange(5, 0, -2, dtype=hsv.dtype, device=hsv.device).reshape(3, 1, 1)  # no host copy
    k = (n + 6.0 * h.unsqueeze(-3)).remainder(6.0)
    w = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return (v.unsqueeze(-3) * (1.0 - s.unsqueeze(-3) * w)).clamp(0.0, 1.0)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Rotate the hue by ``factor`` turns (in [-0.5, 0.5]) in HSV space (torchvision
    ``adjust_hue``; this is its algorithm in a continuous form, equal to ~1e-6)."""
    hsv = _rgb_to_hsv(images)
    f = _per_sample(factor, images)
    f = f.reshape(-1, 1, 1) if f.ndim else f
    h = (hsv[:, 0] + f).remainder(1.0)
    return _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=-3))


def _float32(x: float) -> float:
    """``x`` rounded to float32, as a Python float (exact in float32 arithmetic)."""
    return float(np.float32(x))


def _jitter_blend(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """One blend slot of the jitter: per sample, op 0 brightness (target 0), 1 contrast (the
    image's mean luma), 2 saturation (the pixel's luma), each f x + (1 - f) target, clamped;
    rows with ``use`` False, or op 3 (hue: not a blend), pass through unchanged (f = 1)."""
    op4 = op.reshape(-1, 1, 1, 1)
    f = factors.gather(1, op[:, None].clamp(max=2)).reshape(-1, 1, 1, 1)
    f = torch.where(use.reshape(-1, 1, 1, 1) & (op4 != 3), f, torch.ones_like(f))
    gray = rgb_to_grayscale(x)
    # target = 0, mean luma or luma: one-hot per-sample weights (exact: 1 * t + 0 * t' = t)
    target = gray * (op4 == 2).to(x.dtype) + gray.mean(dim=(-3, -2, -1), keepdim=True) * (op4 == 1).to(x.dtype)
    return _blend(x, target, f)


def color_jitter(
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p: float = 0.8,
    grayscale_p: float = 0.2,
) -> torch.Tensor:
    """DINO's ``RandomApply([ColorJitter(b, c, s, h)], p)`` then ``RandomGrayscale(grayscale_p)``,
    on (B, 3, H, W) float images in [-1, 1] (converted to [0, 1] and back), per sample.

    As torchvision's ColorJitter, each sample applies its four ops in its own random order
    (``randperm(4)``) with factors uniform in [max(0, 1 - s), 1 + s] (hue shift in
    [-hue, hue]); an op whose strength is 0 is the identity. One pass, each op once per
    sample: brightness, contrast and saturation share one form (f x + (1 - f) target), so
    the batch runs three blend slots for the ops a sample orders *before* its hue rotation
    (a slot a sample does not need is f = 1, an exact identity), then one HSV round trip
    for the whole batch, then three slots for the ops after it. Each sample sees exactly
    torchvision's sequence of ops in its own order.

    Draws (B, 10) uniforms: apply, 4 factors, 4 order keys, grayscale.
    """
    u = _rand(images.shape[0], 10, generator=generator).to(images.device, non_blocking=True)
    apply, order, gray_flag = u[:, 0] < p, u[:, 5:9].argsort(dim=1), u[:, 9] < grayscale_p
    # [max(0, 1 - s), 1 + s] in float32 arithmetic (Python floats: no host-to-device copy)
    factors = torch.stack(
        [
            max(0.0, _float32(_float32(1.0) - _float32(s))) + 2.0 * _float32(s) * u[:, 1 + i]
            for i, s in enumerate((brightness, contrast, saturation))
        ]
        + [hue * (2.0 * u[:, 4] - 1.0)],
        dim=1,
    ).to(images.dtype)
    x = ((images + 1.0) * 0.5).clamp(0.0, 1.0)
    hue_at = (order == 3).to(torch.uint8).argmax(dim=1)  # position of the hue op in each order
    out = x
    for pos in range(3):  # the ops before the hue rotation
        out = _jitter_blend(out, order[:, pos], factors, pos < hue_at)
    if hue > 0:
        out = adjust_hue(out, factors[:, 3])
    for j in range(3):  # the ops after it
        pos = hue_at + 1 + j
        out = _jitter_blend(out, order.gather(1, pos.clamp(max=3)[:, None])[:, 0], factors, pos <= 3)
    out = torch.where(apply.reshape(-1, 1, 1, 1), out, x)
    out = torch.where(gray_flag.reshape(-1, 1, 1, 1), rgb_to_grayscale(out).expand_as(out), out)
    return out * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------
# views


def _views(
    images: torch.Tensor,
    generator: torch.Generator | None,
    count: int,
    size: int | Sequence[int],
    scale: Sequence[float] | None,
    cfg: ViewConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` views of every image, view-major: (views, boxes, flips). Draws boxes (none for
    ``scale=None``: the whole image), flips, then colour, in that order."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    b, _, height, width = images.shape
    if scale is None:
        boxes = torch.tensor([[0.0, 0.0, float(width), float(height)]]).expand(count * b, 4)
        if generator is not None:
            boxes = boxes.to(generator.device)
    else:
        boxes = random_resized_crop_boxes(count * b, height, width, scale, cfg.ratio, generator=generator)
    index = torch.arange(b, dtype=boxes.dtype, device=boxes.device).repeat(count)  # view-major
    x = crop_resize(images.float(), torch.cat([index[:, None], boxes], dim=1), size, cfg.sampling_ratio)
    x, flip = random_hflip(x, cfg.flip_p, generator=generator)
    x = color_jitter(
        x,
        generator=generator,
        brightness=cfg.brightness,
        contrast=cfg.contrast,
        saturation=cfg.saturation,
        hue=cfg.hue,
        p=cfg.jitter_p,
        grayscale_p=cfg.grayscale_p,
    )
    return x, boxes, flip


def global_view(
    images: torch.Tensor,
    generator: torch.Generator | None,
    size: int | Sequence[int] | None = None,
    scale: Sequence[float] | None = None,
    *,
    config: ViewConfig | None = None,
) -> torch.Tensor:
    """(B, 3, size, size) float32 in [-1, 1]: each whole image (``scale=None``, the paper's) or
    one random-resized crop of it (area fraction in ``scale``), flipped and colour-jittered. ``size`` None = the images' (H, W).
    ``config`` supplies the aspect range, flip and colour settings (its scales and sizes are
    not used here: see :func:`make_views`)."""
    cfg = config or ViewConfig()
    return _views(images, generator, 1, images.shape[-2:] if size is None else size, scale, cfg)[0]


def local_views(
    images: torch.Tensor,
    generator: torch.Generator | None,
    n: int = 8,
    size: int | Sequence[int] = 96,
    scale: Sequence[float] = (0.05, 0.4),
    *,
    config: ViewConfig | None = None,
) -> torch.Tensor:
    """(n*B, 3, size, size) float32 in [-1, 1], **view-major**: row ``v * B + b`` is view v of
    image b (``.unflatten(0, (n, B))`` -> (n, B, 3, s, s)). Each is a random-resized crop
    (area fraction in ``scale``), flipped and colour-jittered on its own."""
    cfg = config or ViewConfig()
    return _views(images, generator, n, size, scale, cfg)[0]


def mask_count(num_patches: int, ratio: float) -> int:
    """Patches masked per image: ``round(ratio * num_patches)`` (Python's round)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * num_patches))


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    ratio: float = 0.5,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, N) bool, True = masked: exactly ``round(ratio * N)`` (Python's round) positions per
    row, uniformly at random and independently per row (SigLIP 2 masks 50% of every image's
    patches, TIPS-style; not DINOv2's block masks on half the images). Positions index the
    patch tokens row-major (y, x). Draws (B, N) uniforms; the mask is moved to ``device``."""
    k = mask_count(num_patches, ratio)
    noise = _rand(batch_size, num_patches, generator=generator)
    masked = noise.argsort(dim=1)[:, :k]
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, masked, True)
    return mask if device is None else mask.to(device, non_blocking=True)


def make_views(
    images: torch.Tensor, generator: torch.Generator | None, config: ViewConfig | None = None, patch_size: int = 16
) -> DistillViews:
    """All views of one step from the batch's ``image`` (B, 3, H, W) in [-1, 1]: the global
    view (teacher, and masked student), ``config.local_count`` local views (student,
    view-major), and the patch mask for a ``patch_size`` tokeniser on the global view.
    Draws the global view, then the local views, then the mask."""
    cfg = config or ViewConfig()
    gsize = _hw(images.shape[-2:] if cfg.global_size is None else cfg.global_size)
    if gsize[0] < patch_size or gsize[1] < patch_size:
        raise ValueError(f"global view {gsize} is smaller than one {patch_size}-px patch")
    g, gboxes, gflip = _views(images, generator, 1, gsize, cfg.global_scale, cfg)
    loc, lboxes, lflip = _views(images, generator, cfg.local_count, cfg.local_size, cfg.local_scale, cfg)
    n_patches = (gsize[0] // patch_size) * (gsize[1] // patch_size)  # the tower's grid (vit.patchify)
    mask = random_patch_mask(images.shape[0], n_patches, cfg.mask_ratio, generator=generator, device=images.device)
    return DistillViews(g, loc, mask, gboxes, lboxes, gflip, lflip)
