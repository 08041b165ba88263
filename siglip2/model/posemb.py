"""Position-embedding resize (NaFlex, resolution change) and FlexiViT patch-embedding resize.

The released SigLIP 2 weights keep one learned G x G position table (G = 16) and resize it
to every image's patch grid on the fly with **bilinear, antialias=True, align_corners=False**
(transformers `Siglip2VisionEmbeddings.resize_positional_embeddings`). timm's default is
bicubic, which does not reproduce the released numbers, so the resize is written out here.
`method="bv_zoom"` is big_vision's plain-ViT checkpoint loader instead (`models/vit.py
resample_posemb`: `scipy.ndimage.zoom(order=1)`, corner-aligned linear, no antialias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


POSEMB_RESIZE = ("hf", "bv_zoom")


def _as_grid(posemb: torch.Tensor) -> torch.Tensor:
    """A (G*G, W) table as its (G, G, W) grid (a (Gh, Gw, W) grid passes); a non-square
    row count is a `ValueError`."""
    if posemb.ndim != 2:
        return posemb
    g = math.isqrt(posemb.shape[0])
    if g * g != posemb.shape[0]:
        raise ValueError(f"position table of {posemb.shape[0]} rows is not a square grid")
    return posemb.reshape(g, g, -1)


def resize_posemb(posemb: torch.Tensor, hw: tuple[int, int], method: str = "hf") -> torch.Tensor:
    """Resize a (G*G, W) or (G, G, W) table to (h*w, W), row-major.

    `method="hf"` (default): bilinear, half-pixel centres, antialias, exactly as HF's
    `resize_positional_embeddings` (and big_vision's FlexiViT / NaFlex). `"bv_zoom"`:
    corner-aligned linear, no antialias, as `scipy.ndimage.zoom(table, (h/G, w/G, 1), order=1)`
    in big_vision's `vit.resample_posemb` (the two differ by up to ~0.2 of a unit-variance
    table at 16 -> 32). The identity size is returned untouched. Interpolation runs in
    float32 (antialiased bf16/fp16 is not supported on CPU). Raises `ValueError` for a
    non-square (G*G, W) table, a non-positive grid or an unknown method.
    """
    if method not in POSEMB_RESIZE:
        raise ValueError(f"posemb resize method must be one of {POSEMB_RESIZE}, got {method!r}")
    posemb = _as_grid(posemb)
    gh, gw, width = posemb.shape
    h, w = int(hw[0]), int(hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"patch grid must be positive, got {(h, w)}")
    if (h, w) == (gh, gw):
        return posemb.reshape(gh * gw, width)
    x = posemb.permute(2, 0, 1)[None].float()
    if method == "hf":
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    else:  # scipy.ndimage.zoom(order=1): output i samples input i * (G - 1) / (h - 1)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)
    return x[0].reshape(width, h * w).t().to(posemb.dtype)


def grid_shapes(patch_coord: torch.Tensor, patch_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, 2) (y, x) patch coordinates -> (B, 2) grid (h, w) per image; padding ignored."""
    coord = patch_coord.long()
    if patch_valid is not None:
        coord = coord.masked_fill(~patch_valid.bool()[..., None], 0)
    return coord.amax(dim=1) + 1


def _antialias_weights(index: torch.Tensor, out_size: torch.Tensor, in_size: int) -> torch.Tensor:
    """(..., in_size) weights of output cell ``index`` of an ``out_size`` axis resized from
    ``in_size`` cells by ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``:
    the triangle filter stretched by the scale when shrinking, normalised to sum 1
    (PyTorch's ``_compute_weights_aa``; transformers' Siglip2 writes it the same way)."""
    scale = in_size / out_size.float()
    support = scale.clamp(min=1.0)
    center = (index.float() + 0.5) * scale - 0.5
    source = torch.arange(in_size, device=index.device, dtype=torch.float32)
    weights = (1.0 - (source - center[..., None]).abs() / support[..., None]).clamp(min=0.0)
    return weights / weights.sum(-1, keepdim=True)


def posemb_for_batch(
    posemb: torch.Tensor,
    spatial_shapes: torch.Tensor,
    num_tokens: int,
    patch_coord: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position embeddings (B, num_tokens, W) for a batch of images of different grids.

    `spatial_shapes` (B, 2) holds each image's (h, w) patch grid. Without `patch_coord` the
    patches are taken to be row-major with the h*w valid ones first (HF / big_vision layout);
    with `patch_coord` (B, N, 2) (y, x) each patch picks its own cell, so any order works.
    Padding positions receive the image's last cell (they are masked downstream).

    The resize is `resize_posemb`'s (bilinear, antialias, half-pixel centres), written as
    what it is, a linear map: each token's embedding is the table weighted by the outer
    product of its row's and its column's interpolation weights, one (B, N, G*G) @ (G*G, W)
    matmul. Every shape is fixed by (B, N) and the table, whatever the grids: no host sync,
    and `torch.compile` compiles once per sequence length, not once per mix of grids.
    """
    posemb = _as_grid(posemb)
    gh, gw, width = posemb.shape
    shapes = spatial_shapes.long().clamp(min=1)
    h, w = shapes[:, 0:1], shapes[:, 1:2]
    if patch_coord is None:
        idx = torch.arange(num_tokens, device=shapes.device)[None].expand(len(shapes), -1)
    else:
        coord = patch_coord.long()
        idx = coord[..., 0] * w + coord[..., 1]
    idx = torch.minimum(idx.clamp(min=0), h * w - 1)
    row = torch.div(idx, w, rounding_mode="floor")
    weights = _antialias_weights(row, h, gh)[..., :, None] * _antialias_weights(idx - row * w, w, gw)[..., None, :]
    table = posemb.reshape(gh * gw, width).float()
    return (weights.flatten(-2) @ table).to(posemb.dtype)


def resample_patch_embed(
    weight: torch.Tensor,
    new_patch: int,
    channels: int = 3,
    interpolation: str = "bilinear",
    antialias: bool = False,
) -> torch.Tensor:
    """FlexiViT PI-resize of the patch Linear weight (W, p*p*C) -> (W, q*q*C).

    The new kernel is pinv(B^T) w, with B the (q*q, p*p) matrix that resizes a p x p patch to
    q x q, so that <resize(x), w_new> = <x, w> for every p x p patch x when upsampling (the
    least-squares fit when downsampling, e.g. /16 -> /14). By default B is big_vision's
    (`models/proj/flexi/vit.py resample_patchemb`: `tf.image.resize(..., "bilinear")`, half-pixel
    centres, **no antialias**); timm's own default is bicubic + antialias (~15% different).
    The Linear flattens patches in (ph, pw, C) order (HF `convert_image_to_patches`); timm's
    `resample_patch_embed`, which builds B and the pinv, wants a conv kernel (W, C, p, p), so
    this only reshapes around it. The bias needs no change. Raises `ValueError` if the
    fan-in is not p*p*channels.
    """
    from timm.layers import resample_patch_embed as _timm_resample

    width, fan_in = weight.shape
    p = math.isqrt(fan_in // channels)
    if p * p * channels != fan_in:
        raise ValueError(f"patch weight of fan-in {fan_in} is not p*p*{channels}")
    if p == new_patch:
        return weight
    kernel = weight.reshape(width, p, p, channels).permute(0, 3, 1, 2)
    kernel = _timm_resample(kernel, [new_patch, new_patch], interpolation=interpolation, antialias=antialias)
    return kernel.permute(0, 2, 3, 1).reshape(width, new_patch * new_patch * channels).to(weight.dtype)
