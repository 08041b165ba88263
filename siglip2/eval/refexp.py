"""Referring expressions with the LocCa decoder: region caption in, box out (ARef task).

Accuracy is the usual RefCOCO rule: a prediction is correct when IoU >= 0.5 with the
ground-truth box; an output that does not parse as a box counts as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from siglip2.data.boxes import as_boxes, parse_box
from siglip2.data.locca_targets import LoccaFormat, prompt_ids, prompt_text


@torch.no_grad()
def predict_boxes(
    decoder,
    image_tokens: torch.Tensor,
    image_mask: torch.Tensor | None,
    tokenizer,
    region_captions: Sequence[str],
    fmt: LoccaFormat = LoccaFormat(),
    max_new_tokens: int = 24,
) -> list[list[float] | None]:
    """One box per row: row i of ``image_tokens`` is asked for ``region_captions[i]`` with the
    training ARef prompt (repeat an image's tokens to ask several captions). None = unparseable."""
    prompts = [prompt_ids(tokenizer, prompt_text("aref", fmt, caption=c)) for c in region_captions]
    if len(prompts) != image_tokens.shape[0]:
        raise ValueError(f"{len(prompts)} region captions for {image_tokens.shape[0]} images")
    plen = torch.tensor([len(p) for p in prompts], device=image_tokens.device)
    prefix = torch.full((len(prompts), int(plen.max())), tokenizer.pad_id, dtype=torch.long, device=image_tokens.device)
    for i, p in enumerate(prompts):
        prefix[i, : len(p)] = torch.tensor(p)
    new = min(max_new_tokens, decoder.max_len - int(plen.max()) + 1)
    out = decoder.generate(
        image_tokens, image_mask, prefix, new, tokenizer.eos_id, prefix_len=plen, pad_id=tokenizer.eos_id
    )
    return [parse_box(tokenizer.decode(row), fmt.bins) for row in out.tolist()]


def box_iou(a, b) -> torch.Tensor:
    """Elementwise IoU of (K, 4) (or single) normalised x1y1x2y2 boxes -> (K,)."""
    a, b = as_boxes(a), as_boxes(b)
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]).clamp_min(0) * (x[:, 3] - x[:, 1]).clamp_min(0)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def refexp_accuracy(pred_boxes: Sequence, gt_boxes, thr: float = 0.5) -> float:
    """Fraction of predictions with IoU >= ``thr``; None (unparseable) is a miss."""
    gt = as_boxes(gt_boxes)
    if len(pred_boxes) != gt.shape[0] or not len(pred_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions for {gt.shape[0]} ground-truth boxes")
    hits = [p is not None and float(box_iou(p, g[None])[0]) >= thr for p, g in zip(pred_boxes, gt)]
    return sum(hits) / len(hits)
