"""Per-sample image transforms: resize (optionally random-resized-crop and flip) to the
stage's resolution, values in [-1, 1], with boxes carried through the same geometry.

SigLIP resizes to a square without keeping the aspect ratio (big_vision ``resize(224)``),
antialiased. Boxes go through torchvision.transforms.v2 as ``tv_tensors.BoundingBoxes``
next to the image, so a crop or a flip can never move the pixels without the boxes; we
only convert normalised <-> pixel coordinates at the ends and clip to the image.

A box that falls outside the crop comes back with zero width or height (clipped to an
edge) rather than being removed, so box lists stay aligned with their captions; use
:func:`boxes_keep_mask` to drop them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

__all__ = ["ImageTransform", "boxes_keep_mask", "normalize_pixels", "to_unit_range"]


def to_unit_range(img_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1 (the released models' input), on
    the tensor's device: one conversion and two in-place ops, no extra buffer."""
    return img_uint8.to(torch.float32).div_(127.5).sub_(1.0)


PIXEL_KEYS = ("image", "patches", "teacher_image")  # teacher_image: ACID's teacher at its own size


def normalize_pixels(batch: dict) -> dict:
    """A training batch's uint8 pixels (`image` (B, 3, H, W), NaFlex `patches` (B, L, p*p*3),
    ACID's `teacher_image` (B, 3, S, S))
    -> float32 in [-1, 1], on whatever device they are; float pixels and other keys pass
    unchanged. The stage calls this after the batch reached its device (the loader's workers
    never produce float32 pixels: 4x less to collate, pin and copy)."""
    out = dict(batch)
    for key in PIXEL_KEYS:
        value = out.get(key)
        if torch.is_tensor(value) and value.dtype == torch.uint8:
            out[key] = to_unit_range(value)
    return out


def boxes_keep_mask(boxes: torch.Tensor, min_size: float = 0.0) -> torch.Tensor:
    """(K,) bool: boxes whose width and height (normalised units) exceed ``min_size``."""
    if boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return (w > min_size) & (h > min_size)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class ImageTransform:
    """PIL image (+ optional normalised x1y1x2y2 boxes) -> ((3, H, W) image, boxes).

    ``dtype``: ``"float32"`` gives values in [-1, 1]; ``"uint8"`` the resized pixels as they
    are (the training loader's choice; :func:`normalize_pixels` maps them to the same
    float32 values on the device). The resize runs on uint8 either way.

    ``random_resized_crop``: crop area fraction drawn from ``scale``, aspect from ``ratio``
    (torchvision's sampler), then resize; otherwise the whole image is resized.
    ``hflip``: flip with probability 0.5. Randomness comes from torch's global RNG, which
    the DataLoader seeds per worker.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        random_resized_crop: bool = False,
        scale: Sequence[float] = (0.5, 1.0),
        hflip: bool = False,
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        dtype: str = "float32",
    ):
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
        self.dtype = dtype
        self.size = _hw(image_size)
        self.random_resized_crop = bool(random_resized_crop)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = bool(hflip)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")

    def min_source_size(self) -> tuple[int, int]:
        """(w, h) below which a decoded image would be upsampled here: a JPEG decoder may
        downscale (DCT scaling) to no less than this at no loss of output resolution. With
        random-resized-crop the smallest crop (area scale[0], the most extreme aspect) must
        still cover the output."""
        out_h, out_w = self.size
        if not self.random_resized_crop:
            return out_w, out_h
        f = math.sqrt(max(self.ratio[1], 1.0 / self.ratio[0]) / self.scale[0])
        return math.ceil(out_w * f), math.ceil(out_h * f)

    def __call__(self, img: Image.Image | torch.Tensor, boxes: torch.Tensor | None = None):
        x = F.pil_to_tensor(img) if isinstance(img, Image.Image) else img
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected an RGB image, got shape {tuple(x.shape)}")
        in_h, in_w = x.shape[-2:]
        # The image stays a plain tensor (the same torchvision image kernels run on it; the
        # tv_tensors wrapper costs more than the resize itself on small images).
        b = None
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            scale_in = torch.tensor([in_w, in_h, in_w, in_h], dtype=torch.float32)
            b = tv_tensors.BoundingBoxes(boxes * scale_in, format="XYXY", canvas_size=(in_h, in_w))

        if self.random_resized_crop:
            top, left, h, w = RandomResizedCrop.get_params(x, list(self.scale), list(self.ratio))
            x = F.resized_crop(x, top, left, h, w, size=list(self.size), antialias=True)
            if b is not None:
                b = F.resized_crop(b, top, left, h, w, size=list(self.size))
        else:
            x = F.resize(x, size=list(self.size), antialias=True)
            if b is not None:
                b = F.resize(b, size=list(self.size))

        if self.hflip and torch.rand(()) < 0.5:
            x = F.horizontal_flip(x)
            if b is not None:
                b = F.horizontal_flip(b)

        if self.dtype == "uint8":
            out = x.contiguous()
        else:
            out = to_unit_range(x.as_subclass(torch.Tensor).contiguous())
        if b is None:
            return out, None
        out_h, out_w = self.size
        scale_out = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
        nb = (b.as_subclass(torch.Tensor).to(torch.float32) / scale_out).clamp_(0.0, 1.0)
        return out, nb + 0.0  # + 0.0 turns -0.0 into 0.0

    def __repr__(self) -> str:
        return (
            f"ImageTransform(size={self.size}, random_resized_crop="
            f"{self.random_resized_crop}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, dtype={self.dtype!r})"
        )
