"""Bias of a zero-shot classifier: first-order (representation) and second-order (association).

Context: SigLIP 2 (Tschannen et al. 2025, arXiv 2502.14786), section on fairness, reports the
bias measures of "CLIP the Bias: How Useful is Balancing Data in Multimodal Learning?"
(Alabdulmohsin et al., ICLR 2024, arXiv 2403.04547): *representation bias* (first order: how
the model prefers one value of a sensitive attribute, e.g. "man" over "woman", on images that
carry no such attribute) and *association bias* (second order: how the model's predictions of
concepts change with the attribute an image carries). The paper's exact formulas could not be
read from here (only the abstract was reachable), so the two measures below are ours, written
to those definitions; docs/fairness_evals.md says so too.

Both run on zero-shot predictions made the way :mod:`siglip2.eval.zeroshot` makes them: each
class's text embedding is the normalised mean of its prompts' normalised embeddings
(``build_classifier``), each image goes to the class of highest cosine similarity (the first
one on ties). Everything here takes counts, so DDP ranks sum their counts and get the
one-process numbers exactly.

- :func:`representation_bias` (ours): images without the attribute; ``classnames`` are the
  attribute's m values. ``share_k`` = share of images whose best prompt is value k;
  ``bias = max_k |share_k - 1/m|`` in [0, 1 - 1/m] (for m = 2: ``|share_man - 0.5|``; 0 =
  no preference).
- :func:`association_bias` (ours, the definition this project's issue 30 gives): images that
  carry attribute value a; ``classnames`` are concepts. ``P_a(c)`` = share of the images of
  value a predicted as concept c; ``gap(c) = max_a P_a(c) - min_a P_a(c)``; ``bias`` = mean
  over concepts of ``gap(c)``, in [0, min(A, C) / C] for A values and C concepts (0 = predictions
  independent of the attribute).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["representation_bias", "association_bias", "prediction_counts"]


def prediction_counts(
    pred: torch.Tensor, num_classes: int, group: torch.Tensor | None = None, num_groups: int = 1
) -> torch.Tensor:
    """How many predictions fall in each class: (C,) int64, or (G, C) per group.

    pred: (n,) int class indices in ``[0, num_classes)``; group: (n,) int in ``[0, num_groups)``
    (row of each prediction). Raises ValueError on an index out of range."""
    pred = pred.long().reshape(-1)
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predictions must be in [0, {num_classes})")
    if group is None:
        return torch.bincount(pred, minlength=num_classes)
    group = group.long().reshape(-1).to(pred.device)
    if group.shape != pred.shape:
        raise ValueError(f"{group.numel()} groups for {pred.numel()} predictions")
    if group.numel() and (int(group.min()) < 0 or int(group.max()) >= num_groups):
        raise ValueError(f"groups must be in [0, {num_groups})")
    return torch.bincount(group * num_classes + pred, minlength=num_groups * num_classes).reshape(
        num_groups, num_classes
    )


def representation_bias(counts: torch.Tensor) -> dict[str, Any]:
    """First-order bias from how many images preferred each attribute value.

    counts: (m,) non-negative, m >= 2, sum > 0. Returns ``{"share": (m,) float64 in [0, 1]
    summing to 1, "bias": max_k |share_k - 1/m| (float, in [0, 1 - 1/m]), "num_images"}``.
    Raises ValueError for fewer than 2 values or no image."""
    counts = counts.detach().cpu().to(torch.float64).reshape(-1)
    m = counts.numel()
    if m < 2:
        raise ValueError(f"representation bias needs at least 2 attribute values, got {m}")
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("representation bias needs at least one image")
    share = counts / total
    return {"share": share, "bias": float((share - 1.0 / m).abs().max()), "num_images": total}


def association_bias(counts: torch.Tensor) -> dict[str, Any]:
    """Second-order bias from an (attribute value x predicted concept) count table.

    counts: (A, C) non-negative, A >= 2 attribute values, C >= 1 concepts; row a holds how many
    images of value a were predicted as each concept. Returns ``{"p": (A, C) float64, row a =
    P_a(.) (NaN rows for values with no image), "gap": (C,) max_a P_a(c) - min_a P_a(c) over
    the values that have images, "bias": mean of gap (float), "num_images": (A,) images per
    value}``. Raises ValueError when fewer than 2 values have an image (no gap to measure)."""
    counts = counts.detach().cpu().to(torch.float64)
    if counts.ndim != 2 or counts.shape[0] < 2 or counts.shape[1] < 1:
        raise ValueError(f"association bias needs an (A >= 2, C >= 1) count table, got {tuple(counts.shape)}")
    per_value = counts.sum(dim=1)
    present = per_value > 0
    if int(present.sum()) < 2:
        raise ValueError(f"association bias needs images of at least 2 attribute values, got {int(present.sum())}")
    p = counts / per_value.clamp_min(1)[:, None]
    p[~present] = float("nan")
    seen = p[present]
    gap = seen.max(dim=0).values - seen.min(dim=0).values
    return {"p": p, "gap": gap, "bias": float(gap.mean()), "num_images": per_value}
