"""The one patchify: images -> row-major sequences of flattened patches, the released layout.

Used by the fixed-grid tower (`siglip2.model.vit`, on batches) and by the NaFlex loader
(`siglip2.data.naflex.patchify_image`, per image). Pure torch: no model or data import.
"""

from __future__ import annotations

import torch


def patchify(image: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (B, h*w, p*p*C) row-major patches, each flattened (ph, pw, C) as HF does
    (transformers `convert_image_to_patches`), with (h, w) = (H // p, W // p): a size that is not
    a multiple of the patch drops its last H % p rows and W % p columns, as the released models'
    VALID stride-p conv does (transformers `SiglipVisionEmbeddings`, big_vision `vit.py`). Any
    dtype (uint8 pixels stay uint8). Raises ValueError for an image smaller than one patch."""
    b, c, hh, ww = image.shape
    h, w = hh // patch, ww // patch
    if h == 0 or w == 0:
        raise ValueError(f"image {hh}x{ww} is smaller than one {patch}-px patch")
    if hh % patch or ww % patch:
        image = image[:, :, : h * patch, : w * patch]
    x = image.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * w, patch * patch * c), (h, w)
