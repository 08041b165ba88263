"""Image-text retrieval recall@k with several captions per image, computed in chunks.

Definitions (those of CLIP benchmark / open_clip, which agree when there are no ties):
* image -> text: an image is a hit@k if ANY of its captions is among its k best texts.
  Images with no caption are left out of the denominator.
* text -> image: a caption is a hit@k if its image is among its k best images.

Ties. Neither reference defines them (they rank with topk/argsort, whose order among equal
scores is an implementation detail). We count the rank of the correct item as the number of
*wrong* items scoring strictly higher ("optimistic") or higher-or-equal ("pessimistic",
the default), hit@k iff rank < k. Pessimistic is the default because optimistic ties reward
a collapsed model: constant embeddings tie everything and would score recall 1.0. Without
ties both conventions give the references' numbers. For image -> text the correct item is
the image's best-scoring caption; its other captions never count against it.

Memory: one (chunk_size, M) or (chunk_size, N) score tile at a time, no per-row lists.
"""

from typing import Dict, List, Sequence, Tuple, Union

import torch

from ..distributed import all_gather_object, all_gather_variable, is_distributed

Keys = Union[torch.Tensor, Sequence[str]]


def _count_rank(scores: torch.Tensor, pos_score: torch.Tensor, pos_mask: torch.Tensor, ties: str) -> torch.Tensor:
    """Per row: number of wrong items whose score beats (or ties, if pessimistic) pos_score."""
    beats = scores >= pos_score[:, None] if ties == "pessimistic" else scores > pos_score[:, None]
    return (beats & ~pos_mask).sum(dim=1)


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    ties: str = "pessimistic",
) -> Dict[str, float]:
    """Recall@k both ways. image_emb (N, D), text_emb (M, D) (scores are dot products, so
    pass normalised embeddings for cosine similarity); text_to_image (M,) LongTensor: the row
    of image_emb each caption describes. Returns {"image_to_text_R@k", "text_to_image_R@k"}
    (open_clip's names) as floats in [0, 1]. ties: "pessimistic" | "optimistic" (see module).
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    n, m = image_emb.shape[0], text_emb.shape[0]
    text_to_image = text_to_image.to(image_emb.device).long()
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape ({m},), got {tuple(text_to_image.shape)}")
    if m and (text_to_image.min() < 0 or text_to_image.max() >= n):
        raise ValueError("text_to_image holds an index outside [0, N)")
    ks = list(ks)

    i2t_hits = torch.zeros(len(ks), dtype=torch.long)
    i2t_count = 0
    for r0 in range(0, n if m else 0, chunk_size):
        r1 = min(r0 + chunk_size, n)
        scores = image_emb[r0:r1] @ text_emb.T  # (c, M)
        pos_mask = text_to_image[None, :] == torch.arange(r0, r1, device=scores.device)[:, None]
        has_caption = pos_mask.any(dim=1)
        best_pos = scores.masked_fill(~pos_mask, float("-inf")).max(dim=1).values
        rank = _count_rank(scores, best_pos, pos_mask, ties)[has_caption]
        i2t_hits += torch.stack([(rank < k).sum() for k in ks]).cpu()
        i2t_count += int(has_caption.sum())

    t2i_hits = torch.zeros(len(ks), dtype=torch.long)
    for c0 in range(0, m, chunk_size):
        c1 = min(c0 + chunk_size, m)
        scores = text_emb[c0:c1] @ image_emb.T  # (c, N)
        target = text_to_image[c0:c1]
        pos_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, target[:, None], True)
        pos_score = scores.gather(1, target[:, None])[:, 0]
        rank = _count_rank(scores, pos_score, pos_mask, ties)
        t2i_hits += torch.stack([(rank < k).sum() for k in ks]).cpu()

    out = {}
    for i, k in enumerate(ks):
        out[f"image_to_text_R@{k}"] = i2t_hits[i].item() / max(i2t_count, 1)
    for i, k in enumerate(ks):
        out[f"text_to_image_R@{k}"] = t2i_hits[i].item() / max(m, 1)
    return out


def _dedupe_tensor_keys(keys: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each key, in ascending key order."""
    order = torch.sort(keys, stable=True).indices
    sorted_keys = keys[order]
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return order[first]


@torch.no_grad()
def gather_embeddings(embeddings: torch.Tensor, keys: Keys, *extras: torch.Tensor) -> Tuple:
    """Collect per-rank eval outputs on every rank, each sample once, in a fixed order.

    embeddings (n, D); keys: LongTensor (n,) of sample indices or list[str] of sample keys;
    extras: further tensors with n rows (e.g. a caption's image index). Local n may differ
    between ranks. Duplicates (a sample evaluated on two ranks, e.g. by a padded sampler)
    keep one copy; rows come back sorted by key, in one process as under DDP, so results do
    not depend on the world size. Returns (embeddings, keys, *extras) with keys as given
    (LongTensor or list[str]).
    """
    str_keys = not torch.is_tensor(keys)
    if is_distributed():
        embeddings = all_gather_variable(embeddings)
        extras = tuple(all_gather_variable(e) for e in extras)
        if str_keys:
            keys = [k for part in all_gather_object(list(keys)) for k in part]
        else:
            keys = all_gather_variable(keys)
    if str_keys:
        first: Dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        ordered = sorted(first)
        idx = torch.tensor([first[k] for k in ordered], dtype=torch.long, device=embeddings.device)
        keys: List[str] = ordered
    else:
        idx = _dedupe_tensor_keys(keys)
        keys = keys[idx]
    return (embeddings[idx.to(embeddings.device)], keys) + tuple(e[idx.to(e.device)] for e in extras)


def keys_to_positions(keys: Keys, query: Keys) -> torch.LongTensor:
    """Position of each query key in `keys` (e.g. each caption's image key among the gathered
    image keys -> the `text_to_image` argument). Raises if a query key is missing."""
    if torch.is_tensor(keys):
        lookup = {int(k): i for i, k in enumerate(keys.tolist())}
        query = query.tolist() if torch.is_tensor(query) else list(query)
        query = [int(q) for q in query]
    else:
        lookup = {k: i for i, k in enumerate(keys)}
        query = list(query)
    missing = [q for q in query if q not in lookup]
    if missing:
        raise KeyError(f"{len(missing)} keys not found, e.g. {missing[:3]}")
    return torch.tensor([lookup[q] for q in query], dtype=torch.long)
