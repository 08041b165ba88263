"""Zero-shot classification: a text-built classifier and DDP-synced accuracy metrics.

The classifier is built by open_clip's `build_zero_shot_classifier` (the prompt-ensemble
reference: per class, the mean of the L2-normalised embeddings of every template, then
normalised again). We only adapt our interfaces to it: `encode_text(tokens) -> (B, D)` may
be a bare callable, and templates may use "{c}" (our yaml files) as well as "{}" or be
callables (open_clip's metadata).
"""

from typing import Callable, Dict, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# open_clip and torchmetrics are imported where used: each costs seconds at import time
# (they pull in timm / torchvision / audio), which retrieval-only users should not pay.

Template = Union[str, Callable[[str], str]]


class _NormalisedTextEncoder:
    """Gives a bare `encode_text(tokens)` the `model.encode_text(tokens, normalize=True)`
    signature open_clip calls."""

    def __init__(self, encode_text: Callable[[torch.Tensor], torch.Tensor]):
        self._encode_text = encode_text

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self._encode_text(tokens).float()
        return F.normalize(emb, dim=-1) if normalize else emb


def _as_callable(template: Template) -> Callable[[str], str]:
    if callable(template):
        return template
    # format(c, c=c) fills both "{}" and "{c}" placeholders.
    return lambda c, _t=template: _t.format(c, c=c)


def build_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: Union[str, torch.device] = "cpu",
    num_classes_per_batch: int = 10,
) -> torch.Tensor:
    """Zero-shot classifier weights (D, C), each column L2-normalised.

    encode_text: tokens (B, L) -> (B, D) (e.g. `model.encode_text`; an object with an
    `encode_text` method is accepted too). tokenizer: list[str] -> LongTensor (B, L); ours
    lower-cases and pads as SigLIP needs. Runs under no_grad; the caller sets eval mode.
    """
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    if hasattr(encode_text, "encode_text"):
        encode_text = encode_text.encode_text
    return build_zero_shot_classifier(
        _NormalisedTextEncoder(encode_text),
        tokenizer,
        classnames=list(classnames),
        templates=[_as_callable(t) for t in templates],
        num_classes_per_batch=num_classes_per_batch,
        device=device,
    )


def zeroshot_logits(image_emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (B, C) of images to the class embeddings. The image embeddings
    are normalised here (a no-op for the model's already normalised output); no logit scale
    or bias, which do not change the ranking of classes."""
    return F.normalize(image_emb.float(), dim=-1) @ classifier.to(image_emb.device).float()


class ZeroShotMetrics(nn.Module):
    """Top-1 / top-5 accuracy (micro: fraction of samples), per-class accuracy (recall of
    each class, 0 for a class with no samples) and the number of images scored, from torchmetrics, so states are summed
    across DDP ranks on `compute()`. top-5 uses top_k = min(5, num_classes). The eval loader
    must yield every sample exactly once across ranks (ours does), as nothing is deduped.
    """

    def __init__(self, num_classes: int):
        from torchmetrics.aggregation import SumMetric
        from torchmetrics.classification import MulticlassAccuracy

        super().__init__()
        self.num_classes = num_classes
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.per_class = MulticlassAccuracy(num_classes, top_k=1, average=None)
        self.num_images = SumMetric()

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float(), labels.detach().long()
        for m in (self.top1, self.top5, self.per_class):
            m.update(logits, labels)
        self.num_images.update(float(labels.numel()))

    def compute(self) -> Dict[str, torch.Tensor]:
        return {
            "top1": self.top1.compute(),
            "top5": self.top5.compute(),
            "per_class": self.per_class.compute(),
            "num_images": self.num_images.compute(),
        }

    def reset(self) -> None:
        for m in (self.top1, self.top5, self.per_class, self.num_images):
            m.reset()
