"""Boxes for LocCa: geometry that follows the image, and boxes written as text.

All boxes are normalised ``x1 y1 x2 y2`` in [0, 1] relative to the image they belong to, so a
resize leaves them unchanged and only crops, pads and flips move them. Pure functions on
(K, 4) float tensors (lists are accepted) so the fixed-resolution transforms, NaFlex and the
eval code can share them.

Box serialisation is **not published** in SigLIP 2. LocCa writes coordinates as quantised
integers in plain text; our default is 4 integers ``"x1 y1 x2 y2"`` in 500 bins, e.g.
``"37 120 250 401"``, encoded by the ordinary tokenizer (no extra location tokens, so any
text tokenizer works). ``bins`` is a parameter everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

DEFAULT_BINS = 500


def as_boxes(boxes) -> torch.Tensor:
    """(K, 4) float32 tensor from a tensor, a list of boxes, or one box."""
    t = torch.as_tensor(boxes, dtype=torch.float32)
    return t.reshape(-1, 4) if t.numel() else t.reshape(0, 4)


def crop_boxes(boxes, crop_xyxy: Sequence[float], image_size: Sequence[int] | None = None) -> torch.Tensor:
    """Boxes in the frame of a crop, clipped to it.

    ``crop_xyxy`` is the crop window in the *source* image, normalised like the boxes, or in
    pixels when ``image_size=(width, height)`` is given. A box that falls outside the crop
    comes back with zero width or height; drop it with ``boxes_valid``.
    """
    b = as_boxes(boxes)
    c = torch.as_tensor(crop_xyxy, dtype=torch.float32)
    if image_size is not None:
        w, h = image_size
        c = c / torch.tensor([w, h, w, h], dtype=torch.float32)
    cw, ch = (c[2] - c[0]).clamp_min(1e-12), (c[3] - c[1]).clamp_min(1e-12)
    out = (b - c[[0, 1, 0, 1]]) / torch.stack([cw, ch, cw, ch])
    return out.clamp(0.0, 1.0)


def hflip_boxes(boxes) -> torch.Tensor:
    """Boxes after a horizontal flip of the image: x -> 1 - x, so x1 and x2 swap roles."""
    b = as_boxes(boxes)
    return torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], dim=1)


def resize_boxes(boxes, old_size=None, new_size=None) -> torch.Tensor:
    """Identity: normalised boxes do not move when the whole image is resized (any aspect
    change included). Exists so that every transform has a box counterpart to call."""
    return as_boxes(boxes).clone()


def pad_boxes(boxes, old_size: Sequence[int], new_size: Sequence[int]) -> torch.Tensor:
    """Boxes after placing an image of ``old_size=(w, h)`` at the top-left of a larger
    ``new_size`` canvas (padding right and bottom), as a patch-grid pad does."""
    b = as_boxes(boxes)
    sx, sy = old_size[0] / new_size[0], old_size[1] / new_size[1]
    return b * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def boxes_valid(boxes, min_size: float = 1e-3) -> torch.Tensor:
    """(K,) bool: boxes with width and height of at least ``min_size`` (drops boxes that a
    crop pushed out of the image)."""
    b = as_boxes(boxes)
    return ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)


def quantize_box(box, bins: int = DEFAULT_BINS) -> list[int]:
    """Normalised box -> 4 bin indices in [0, bins - 1] (bin i covers [i/bins, (i+1)/bins)).

    Float64 plus a 1e-4-bin nudge so that a boundary value stored in float32 (0.24 ->
    0.2399999946) lands in the bin a person expects (120, not 119)."""
    src = box if isinstance(box, torch.Tensor) else torch.as_tensor(box, dtype=torch.float64)
    b = src.reshape(-1, 4)[0].tolist()  # Python floats: float64, exact for float32 input
    # the same float64 arithmetic as a tensor version, without per-box tensor ops
    return [min(max(math.floor(float(v) * bins + 1e-4), 0), bins - 1) for v in b]


def dequantize_box(q: Sequence[int], bins: int = DEFAULT_BINS) -> list[float]:
    """Bin indices -> normalised box at the bin centres (error <= half a bin)."""
    return [(int(v) + 0.5) / bins for v in q]


def box_to_text(box, bins: int = DEFAULT_BINS) -> str:
    """Normalised box -> ``"x1 y1 x2 y2"`` with quantised integers."""
    return " ".join(str(v) for v in quantize_box(box, bins))


_INT = re.compile(r"\d+")


def parse_box(text, bins: int = DEFAULT_BINS) -> list[float] | None:
    """Decoded model output -> normalised box, or None when it is not a box.

    Takes the first four integers in the text (so trailing tokens after the box do no harm),
    and rejects fewer than four, values outside [0, bins), and x2 < x1 or y2 < y1. Never raises:
    a model early in training emits anything.
    """
    if not isinstance(text, str):
        return None
    nums = _INT.findall(text)
    if len(nums) < 4 or any(len(n) > 9 for n in nums[:4]):  # huge digit runs: not a box
        return None
    q = [int(n) for n in nums[:4]]
    if any(v >= bins for v in q) or q[2] < q[0] or q[3] < q[1]:
        return None
    return dequantize_box(q, bins)
