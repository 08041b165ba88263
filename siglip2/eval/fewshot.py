"""Few-shot linear probe on frozen image embeddings: big_vision's closed-form least squares.

Source: ``big_vision/evaluators/fewshot_lsr.py`` (google-research/big_vision; the evaluator
behind the "few-shot" numbers of the ViT / LiT / SigLIP line of papers) and its standard
settings in ``big_vision/configs/common_fewshot.py``. What is carried over (the facts, not the
code):

- **Features**: one vector per image. The evaluator's default representation is the image
  tower's output embedding ``zimg``, which big_vision's two-tower model L2-normalises
  (``models/proj/image_text/two_towers.py``); ours is ``ImageOutput.embeds`` (D,), the same
  thing. (Some big_vision configs name another layer, e.g. CLIPPO's ``img/pre_logits``; for a
  tower without a projection head, as SigLIP's, that is the same vector before normalisation,
  a per-image scale.)
- **Whitening**: per dimension, the mean and the standard deviation (population, ddof 0) of
  the *few-shot training examples* of this draw, plus ``1e-5`` on the std:
  ``x <- (x - mean) / (std + 1e-5)``; the test images are whitened with the same statistics.
- **Bias**: a constant feature of value ``100`` is appended (:data:`BIAS_CONSTANT`), large
  so that its weight is almost unregularised.
- **Targets**: one-hot labels mapped to {-1, +1} (``2 * one_hot - 1``), shape (N, C).
- **Solve**: ridge regression, ``W = (X^T X + l2 I)^-1 X^T Y`` when N >= D + 1, else the
  equal dual form ``W = X^T (X X^T + l2 I)^-1 Y`` (big_vision takes the same branch; it goes
  through an eigendecomposition so as to reuse it across l2 values, we solve directly, in
  float64). The bias column is regularised like the others (its size 100 makes that weak).
- **l2**: a fixed constant, ``2 ** 10`` (:data:`DEFAULT_L2_REG`, ``common_fewshot.py``); no
  validation-based choice.
- **Prediction / score**: ``argmax(x_test W)`` (first index on ties), top-1 accuracy = the
  share of test images predicted right (micro average).
- **Draw of the shots**: for seed ``s`` a ``numpy.random.default_rng(s)`` draws one
  permutation of each class's training indices (classes in index order); ``k`` shots take the
  first ``k`` of each class (so within a seed the 5 shots contain the 1 shot), a class with
  fewer than ``k`` examples gives all it has. Seeds are ``0 .. seeds-1``.

What is ours:

- **One set, split by key**: big_vision reads a train split and a test split of a TFDS set;
  our eval sets are one set of shards, split by the dense probe's rule
  (:func:`siglip2.eval.dense_probe.is_train_key`, ``crc32(key) / 2**32 < 0.5``): the training
  keys form the pool the shots are drawn from, the other keys are the test images. The rule
  depends on the key alone (not on shard order, ranks or workers).
- **Pool order**: the pool is sorted by sample key before the draw (big_vision uses the
  dataset's order), so one process and N DDP ranks draw the same shots.
- **Aggregation**: big_vision reports one number per seed; we report the mean and the
  population standard deviation (ddof 0) over seeds of each shot count.
- **Defaults**: shots ``(1, 5, 10)`` and 5 seeds (big_vision: ``[1, 5, 10, 25]`` and 3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from siglip2.eval.dense_probe import is_train_key

__all__ = [
    "BIAS_CONSTANT",
    "DEFAULT_L2_REG",
    "DEFAULT_SHOTS",
    "DEFAULT_SEEDS",
    "TRAIN_FRACTION",
    "STD_EPS",
    "LsrProbe",
    "fit_lsr",
    "draw_shots",
    "fewshot_accuracy",
    "run_fewshot",
]

log = logging.getLogger(__name__)

BIAS_CONSTANT = 100.0  # the appended constant feature (big_vision fewshot_lsr.py)
STD_EPS = 1e-5  # added to the whitening std (big_vision fewshot_lsr.py)
DEFAULT_L2_REG = 2.0**10  # big_vision configs/common_fewshot.py
DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_SEEDS = 5
TRAIN_FRACTION = 0.5  # share of keys in the training pool (dense_probe.is_train_key's default)


@dataclass
class LsrProbe:
    """A fitted probe: whitening statistics and the weights of the augmented features.

    mean, std: (1, D) float64 (std already includes :data:`STD_EPS`); weight: (D + 1, C)
    float64, its last row the bias feature's."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) embeddings -> (n, D + 1) float64 whitened features with the bias column."""
        x = (x.to(torch.float64) - self.mean) / self.std
        return F.pad(x, (0, 1), value=BIAS_CONSTANT)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, C) regression outputs (float64)."""
        return self.features(x) @ self.weight

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n,) int64 class indices, the first maximum on ties."""
        return self.scores(x).argmax(dim=1)


def fit_lsr(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2_reg: float = DEFAULT_L2_REG) -> LsrProbe:
    """L2-regularised least squares of {-1, +1} one-hot targets on whitened features (module doc).

    x: (N, D) float embeddings, N >= 1; y: (N,) integer labels in ``[0, num_classes)``;
    l2_reg > 0. Computed in float64 on the CPU. Raises ValueError on empty input, mismatched
    shapes, a label out of range or a non-positive l2_reg."""
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"fit_lsr needs x (N, D) with N >= 1 and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not l2_reg > 0:
        raise ValueError(f"l2_reg must be > 0, got {l2_reg}")
    y = y.detach().cpu().long()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    x = x.detach().cpu().to(torch.float64)
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, unbiased=False, keepdim=True) + STD_EPS
    probe = LsrProbe(mean, std, torch.empty(0))
    xa = probe.features(x)  # (N, D + 1)
    targets = 2.0 * F.one_hot(y, num_classes).to(torch.float64) - 1.0  # (N, C) in {-1, +1}
    n, d = xa.shape
    if n >= d:  # primal: (D+1) x (D+1) system
        probe.weight = torch.linalg.solve(xa.T @ xa + l2_reg * torch.eye(d, dtype=torch.float64), xa.T @ targets)
    else:  # dual: N x N system, the same minimiser
        probe.weight = xa.T @ torch.linalg.solve(xa @ xa.T + l2_reg * torch.eye(n, dtype=torch.float64), targets)
    return probe


def draw_shots(
    labels: np.ndarray | torch.Tensor, num_classes: int, shots: Sequence[int], seed: int
) -> dict[int, np.ndarray]:
    """Indices into ``labels`` (the training pool, in its order) of each shot count's examples.

    One ``numpy.random.default_rng(seed)`` permutation per class (classes 0..C-1 in order),
    the first ``k`` of each; concatenated class by class. Returns {k: int64 (<= k*C,)}."""
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return {int(k): np.concatenate([idx[:k] for idx in per_class]).astype(np.int64) for k in shots}


def fewshot_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = DEFAULT_SEEDS,
    l2_reg: float = DEFAULT_L2_REG,
) -> dict[int, list[float]]:
    """Top-1 accuracy (in [0, 1]) of the probe per shot count and seed: {k: [acc seed 0, ...]}.

    train_x (N, D) / train_y (N,): the pool, in the order the draw indexes (the caller sorts
    it); test_x (M, D) / test_y (M,), M >= 1. Raises ValueError when the pool is empty."""
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError(
            f"few-shot needs a non-empty pool and test part, got {train_x.shape[0]} and {test_x.shape[0]} images"
        )
    test_y = test_y.cpu().long()
    out: dict[int, list[float]] = {int(k): [] for k in shots}
    for seed in range(int(seeds)):
        for k, idx in draw_shots(train_y, num_classes, shots, seed).items():
            t = torch.from_numpy(idx)
            probe = fit_lsr(train_x[t], train_y[t], num_classes, l2_reg)
            out[k].append(float((probe.predict(test_x) == test_y).double().mean()))
    return out


def run_fewshot(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    keys: Sequence[str],
    num_classes: int,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = DEFAULT_SEEDS,
    l2_reg: float = DEFAULT_L2_REG,
    train_fraction: float = TRAIN_FRACTION,
) -> dict[str, float]:
    """The whole protocol on one set's embeddings (all of them, gathered from every rank).

    embeddings (n, D) float; labels (n,) int in ``[0, num_classes)``; keys: n sample keys.
    Rows are sorted by key (a stable sort: equal keys keep their given order) and split by
    :func:`~siglip2.eval.dense_probe.is_train_key`. Returns ``{"<k>shot_top1": mean,
    "<k>shot_top1_std": population std over seeds, ... , "num_train_pool", "num_test_images",
    "num_images"}`` (accuracies in [0, 1]); only the three counts when the pool or the test
    part is empty (with a warning)."""
    n = embeddings.shape[0]
    if labels.shape != (n,) or len(keys) != n:
        raise ValueError(f"{n} embeddings, {tuple(labels.shape)} labels and {len(keys)} keys disagree")
    if len(set(keys)) != n:
        log.warning(
            "few-shot: %d sample keys repeat; the split and the draw follow the key, so repeated keys "
            "may order differently with another number of ranks",
            n - len(set(keys)),
        )
    order = sorted(range(n), key=lambda i: keys[i])
    train = torch.tensor([is_train_key(keys[i], train_fraction) for i in order], dtype=torch.bool)
    index = torch.tensor(order, dtype=torch.long)
    x = embeddings.detach().cpu()[index]
    y = labels.detach().cpu().long()[index]
    counts = {"num_train_pool": float(train.sum()), "num_test_images": float((~train).sum()), "num_images": float(n)}
    if not train.any() or train.all():
        log.warning(
            "few-shot skipped: %d pool and %d test images (the split is by key, half each)",
            int(counts["num_train_pool"]),
            int(counts["num_test_images"]),
        )
        return counts
    pool_y = y[train]
    per_class = torch.bincount(pool_y, minlength=num_classes)
    short = int((per_class < max(shots)).sum())
    if short:
        log.warning(
            "few-shot: %d of %d classes have fewer than %d pool images (they train on all they have)",
            short,
            num_classes,
            max(shots),
        )
    acc = fewshot_accuracy(x[train], pool_y, x[~train], y[~train], num_classes, shots, seeds, l2_reg)
    out: dict[str, float] = {}
    for k, values in acc.items():
        out[f"{k}shot_top1"] = float(np.mean(values))
        out[f"{k}shot_top1_std"] = float(np.std(values))
    return {**out, **counts}
