"""Fit a checkpoint's image-tower weights to another resolution or patch size [P §2.4.1].

SigLIP 2's fixed-resolution variants continue the 95% checkpoint at the target resolution
(RECIPE.md, "Fixed-resolution variants"): the learned position table is resized to the new
patch grid (`resize_posemb`: HF's bilinear + antialias, or big_vision's `bv_zoom`) and, for a
patch-size change (/16 -> /14), the patch embedding is PI-resized (`resample_patch_embed`,
big_vision's FlexiViT rule). Only these two tensors depend on the resolution; every other
architecture field must agree, or the weights do not fit and `ValueError` names the fields.

Works on a whole stage state_dict: every image tower under one of `prefixes` (the student
`model.vision_model.` and the EMA teacher `teacher.vision.`) is adapted the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

import torch

from .posemb import resample_patch_embed, resize_posemb
from .two_tower import SigLIP2Config

__all__ = ["architecture_differences", "adapt_vision_weights", "TOWER_PREFIXES"]

POSEMB = "embeddings.position_embedding.weight"
PATCH = "embeddings.patch_embedding.weight"
TOWER_PREFIXES = ("model.vision_model.", "teacher.vision.")
# Fields that change with the resolution and that adaptation handles; the rest must match.
RESOLUTION_FIELDS = {"vision.image_size", "vision.patch_size", "vision.posemb_grid"}


def _flat(cfg: SigLIP2Config) -> dict[str, object]:
    out = {}
    for key, value in asdict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def architecture_differences(
    source: SigLIP2Config,
    target: SigLIP2Config,
    ignore: Sequence[str] = ("name", "compile", "logit_scale_init", "logit_bias_init"),
) -> dict[str, tuple[object, object]]:
    """{dotted field: (source value, target value)} for every model-config field that differs,
    init-only and runtime fields (`ignore`) left out."""
    a, b = _flat(source), _flat(target)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}


@torch.no_grad()
def adapt_vision_weights(
    state: Mapping[str, torch.Tensor],
    source: SigLIP2Config,
    target: SigLIP2Config,
    *,
    posemb_resize: str = "hf",
    prefixes: Sequence[str] = TOWER_PREFIXES,
    what: str = "checkpoint",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return (`state` with its image towers fitted to `target`, human-readable notes).

    `source`: the configuration the weights were trained with (the checkpoint's); `target`:
    the one to run. Position tables (G*G, W) are resized to `target.vision.posemb_grid`;
    patch weights (W, p*p*C) PI-resized to `target.vision.patch_size`. Raises `ValueError`
    naming every differing field other than image size, patch size and position grid (depth,
    width, vocabulary, text length...): such weights cannot be adapted.
    """
    diff = architecture_differences(source, target)
    fixed = {k: v for k, v in diff.items() if k not in RESOLUTION_FIELDS}
    if fixed:
        raise ValueError(
            f"the {what}'s model differs from this run's in "
            + ", ".join(f"{k} ({a} in the {what}, {b} here)" for k, (a, b) in fixed.items())
            + ": only image_size, patch_size and posemb_grid can be adapted"
        )
    out = dict(state)
    notes: list[str] = []
    sv, tv = source.vision, target.vision
    for prefix in prefixes:
        if prefix + POSEMB not in out:
            continue
        if tv.posemb_grid != sv.posemb_grid:
            out[prefix + POSEMB] = resize_posemb(out[prefix + POSEMB], (tv.posemb_grid, tv.posemb_grid), posemb_resize)
            notes.append(
                f"{prefix}{POSEMB}: position table {sv.posemb_grid}x{sv.posemb_grid} -> "
                f"{tv.posemb_grid}x{tv.posemb_grid} ({posemb_resize})"
            )
        if tv.patch_size != sv.patch_size:
            out[prefix + PATCH] = resample_patch_embed(out[prefix + PATCH], tv.patch_size, tv.channels)
            notes.append(f"{prefix}{PATCH}: patch {sv.patch_size} -> {tv.patch_size} (PI-resize)")
    if sv.image_size != tv.image_size:
        notes.append(f"image size {sv.image_size} -> {tv.image_size} px")
    return out, notes
