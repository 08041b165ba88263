"""Evaluation library: zero-shot classification and image-text retrieval (DDP-aware)."""

from .retrieval import gather_embeddings, keys_to_positions, retrieval_recall
from .zeroshot import ZeroShotMetrics, build_classifier, zeroshot_logits

__all__ = [
    "build_classifier",
    "zeroshot_logits",
    "ZeroShotMetrics",
    "retrieval_recall",
    "gather_embeddings",
    "keys_to_positions",
]
