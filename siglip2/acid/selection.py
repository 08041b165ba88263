"""ACID's selection maths [P §2.5; JEST arXiv 2406.17711; ACID arXiv 2411.18674].

Each step, the b examples a small model trains on are chosen from a super-batch of
b / (1 - f) by *learnability*: what the learner still gets wrong and a strong teacher gets
right. The sigmoid loss is a sum over pairs, so learnability is a matrix over the
super-batch (RECIPE.md "ACID distillation"):

    A_ij = l_ij(learner) - l_ij(teacher)     (`siglip2.losses.sigmoid.sigmoid_pair_losses`,
                                              each model with its own t and b)

Selection (`CurationConfig.method`):
- `joint` (JEST's joint example selection, default; which one SigLIP 2 used is not
  published): the batch is drawn in `n_chunks` chunks. The first chunk is sampled by the
  diagonal A_kk; each later candidate k is scored by what it adds to the learnability of
  the batch chosen so far S, sum(A[S+k, S+k]) - sum(A[S, S]) = A_kk + sum_{j in S} (A_kj + A_jk),
  and a chunk is sampled without replacement from softmax(scores) (Gumbel top-k).
- `sample`: every chunk sampled by the diagonal alone (independent selection, sampled).
- `topk`: the b examples of largest A_kk (independent selection, greedy).
- `random`: b examples uniformly at random (the ablation: same data, no scoring).

Sampling uses one Gumbel vector per chunk, `-log(-log(U))` with U = torch.rand(N) drawn
from the caller's generator, so a selection is reproducible from (seed, step, rank).
Selection is per rank on the rank's own super-batch: a global 64k x 64k matrix is
impractical, and the recipe's batch is the union of the ranks' choices.

Plain tensor maths on the (N, N) matrix: nothing here loads a model (the teacher is
`siglip2.acid.teacher`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("joint", "sample", "topk", "random")


@dataclass
class CurationConfig:
    """`stage.acid`'s selection keys. `filter_ratio` f: the share of the super-batch dropped
    (0.5: the loader yields 2b per rank, b train; the paper: 0.5 for B/16, 0.75 for B/32;
    0 trains every example, no scoring). `n_chunks`: JEST's chunks (16)."""

    filter_ratio: float = 0.5
    method: str = "joint"
    n_chunks: int = 16

    def __post_init__(self):
        if not 0.0 <= float(self.filter_ratio) < 1.0:
            raise ValueError(f"acid.filter_ratio must be in [0, 1), got {self.filter_ratio}")
        if self.method not in METHODS:
            raise ValueError(f"acid.method must be one of {METHODS}, got {self.method!r}")
        if int(self.n_chunks) < 1:
            raise ValueError(f"acid.n_chunks must be >= 1, got {self.n_chunks}")

    def super_batch(self, batch_size: int) -> int:
        """Examples the loader yields per rank so that `batch_size` are kept: b / (1 - f), rounded."""
        return max(int(batch_size), round(int(batch_size) / (1.0 - float(self.filter_ratio))))


def chunk_sizes(k: int, n_chunks: int) -> list[int]:
    """`k` examples in `min(n_chunks, k)` chunks, as equal as possible, larger ones first."""
    n = max(1, min(int(n_chunks), int(k)))
    base, extra = divmod(int(k), n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def gumbel(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n,) standard Gumbel noise, -log(-log(U)), U ~ torch.rand from `generator`."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    u = u.clamp(torch.finfo(torch.float64).tiny, 1.0 - torch.finfo(torch.float64).eps)
    return -torch.log(-torch.log(u))


def _gumbel_chunks(scores, n: int, k: int, n_chunks: int, generator, device) -> torch.Tensor:
    """k indices of n drawn in `chunk_sizes(k, n_chunks)` chunks without replacement: each
    chunk is the top of `scores(chosen)` + one Gumbel vector (Gumbel top-k = sampling from
    softmax(scores) without replacement)."""
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    picked: list[torch.Tensor] = []
    for size in chunk_sizes(k, n_chunks):
        noisy = scores(chosen) + gumbel(n, generator, device)
        noisy[chosen] = -math.inf
        new = noisy.topk(size).indices
        chosen[new] = True
        picked.append(new)
    return torch.cat(picked)


def joint_select(
    learnability: torch.Tensor, k: int, n_chunks: int = 16, generator: torch.Generator | None = None
) -> torch.Tensor:
    """JEST's joint example selection: (N, N) learnability -> (k,) long indices, without
    repeats, in the order drawn. Raises `ValueError` if k > N or the matrix is not square."""
    a = _check(learnability, k).double()
    diag = a.diagonal()

    def scores(chosen: torch.Tensor) -> torch.Tensor:
        s = chosen.double()
        return diag + a @ s + s @ a  # A_kk + sum_{j in S} (A_kj + A_jk); the diagonal alone while S is empty

    return _gumbel_chunks(scores, a.shape[0], k, n_chunks, generator, a.device)


def independent_select(
    learnability: torch.Tensor, k: int, sample: bool = True, n_chunks: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each example scored alone by its diagonal A_kk: the top k (`sample=False`) or k drawn
    without replacement from softmax(A_kk) (Gumbel top-k, one vector per chunk as in `joint_select`)."""
    a = _check(learnability, k).double()
    diag = a.diagonal()
    if not sample:
        return diag.topk(k).indices
    return _gumbel_chunks(lambda chosen: diag, a.shape[0], k, n_chunks, generator, a.device)


def random_select(n: int, k: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """k of n indices uniformly at random, without repeats."""
    if k > n:
        raise ValueError(f"cannot choose {k} examples from {n}")
    return torch.randperm(n, generator=generator, device=device)[:k]


def select(
    learnability: torch.Tensor | None,
    n: int,
    k: int,
    cfg: CurationConfig,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """The `cfg.method` selection of k of the n examples (`learnability` may be None for `random`)."""
    if cfg.method == "random":
        return random_select(n, k, generator, device)
    if learnability is None:
        raise ValueError(f"acid.method={cfg.method!r} needs the learnability matrix")
    if cfg.method == "joint":
        return joint_select(learnability, k, cfg.n_chunks, generator)
    return independent_select(
        learnability, k, sample=cfg.method == "sample", n_chunks=cfg.n_chunks, generator=generator
    )


def _check(a: torch.Tensor, k: int) -> torch.Tensor:
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"learnability must be a square (N, N) matrix, got {tuple(a.shape)}")
    if not 0 < int(k) <= a.shape[0]:
        raise ValueError(f"cannot choose {k} examples from {a.shape[0]}")
    return a
