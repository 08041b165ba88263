"""Active data curation for ACID distillation [P §2.5; JEST arXiv 2406.17711; ACID arXiv 2411.18674].

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

The teacher is frozen, so its embeddings can be computed once (`python -m
siglip2.data.curation cache`, see `main`) and read instead of running it every step.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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


def joint_select(learnability: torch.Tensor, k: int, n_chunks: int = 16,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """JEST's joint example selection: (N, N) learnability -> (k,) long indices, without
    repeats, in the order drawn. Raises `ValueError` if k > N or the matrix is not square."""
    a = _check(learnability, k).double()
    diag = a.diagonal()

    def scores(chosen: torch.Tensor) -> torch.Tensor:
        s = chosen.double()
        return diag + a @ s + s @ a  # A_kk + sum_{j in S} (A_kj + A_jk); the diagonal alone while S is empty

    return _gumbel_chunks(scores, a.shape[0], k, n_chunks, generator, a.device)


def independent_select(learnability: torch.Tensor, k: int, sample: bool = True, n_chunks: int = 1,
                       generator: torch.Generator | None = None) -> torch.Tensor:
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


def select(learnability: torch.Tensor | None, n: int, k: int, cfg: CurationConfig,
           generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The `cfg.method` selection of k of the n examples (`learnability` may be None for `random`)."""
    if cfg.method == "random":
        return random_select(n, k, generator, device)
    if learnability is None:
        raise ValueError(f"acid.method={cfg.method!r} needs the learnability matrix")
    if cfg.method == "joint":
        return joint_select(learnability, k, cfg.n_chunks, generator)
    return independent_select(learnability, k, sample=cfg.method == "sample", n_chunks=cfg.n_chunks,
                              generator=generator)


def _check(a: torch.Tensor, k: int) -> torch.Tensor:
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"learnability must be a square (N, N) matrix, got {tuple(a.shape)}")
    if not 0 < int(k) <= a.shape[0]:
        raise ValueError(f"cannot choose {k} examples from {a.shape[0]}")
    return a


# ---------------------------------------------------------------- the teacher's inputs and cache
def load_teacher(spec: str) -> tuple["SigLIP2", dict[str, Any]]:
    """The frozen teacher (eval mode, no gradient) and a record of where it came from."""
    if str(spec).startswith("hf:"):
        from siglip2.export.hf import from_hf

        model = from_hf(str(spec)[3:])
        record = {"path": str(spec), "stage": "hf"}
    else:
        from siglip2.checkpoint import read_checkpoint

        ckpt = read_checkpoint(str(spec))
        model = ckpt.model("student")
        record = {"path": str(spec), "stage": ckpt.stage, "tokenizer": ckpt.meta.get("tokenizer")}
    model.eval().requires_grad_(False)
    record["model"] = model.config.to_dict()
    return model, record


def refit_text_length(tokens: torch.Tensor, length: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """(B, L) padded, EOS-terminated ids -> (B, length), as the tokenizer would have written
    them at `length`: padded on the right, or cut with the last slot EOS when the caption no
    longer fits ("sticky" EOS). A caption already cut at L stays cut."""
    b, cur = tokens.shape
    if length == cur:
        return tokens
    if length > cur:
        return torch.cat([tokens, tokens.new_full((b, length - cur), pad_id)], dim=1)
    out = tokens[:, :length].clone()
    ended = (out == eos_id).any(dim=1)
    out[~ended, -1] = eos_id
    return out


def teacher_inputs(teacher_config, image: torch.Tensor, text: torch.Tensor, pad_id: int | None = None,
                   eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's batch as the teacher (`SigLIP2Config`) takes it: images (B, 3, S, S)
    resized to its resolution (bilinear, antialiased, on the device) and ids refitted to its
    text length (`refit_text_length`; needs the tokenizer's pad and EOS ids when the lengths differ)."""
    size = int(teacher_config.vision.image_size)
    if tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    length = int(teacher_config.text.max_len)
    if text.shape[1] != length:
        if pad_id is None or eos_id is None:
            raise ValueError(f"the teacher's text length {length} differs from the batch's {text.shape[1]}: "
                             "the tokenizer's pad and EOS ids are needed to refit the ids")
        text = refit_text_length(text, length, pad_id, eos_id)
    return image, text


class TeacherCache:
    """The frozen teacher's embeddings of every training sample, by sample key (a file
    written by `python -m siglip2.data.curation cache`). Exact: the teacher is frozen and the
    cached inputs are what training would give a live teacher with `teacher_pixels=source` (each
    source image squashed to the teacher's resolution, the learner's ids), which requires a
    deterministic image transform (no random resized crop). `image_size`: the pixels the
    teacher saw.

    `lookup(keys)` -> (image_emb, text_emb) rows, (N, D) float32; a key the cache lacks is a
    `KeyError` naming how many and which (a cache built from other shards)."""

    def __init__(self, path: str | Path):
        from siglip2.checkpoint import load_plain  # tensors and plain values only: never runs pickled code

        raw = load_plain(path)
        if not isinstance(raw, dict) or raw.get("kind") != "siglip2-teacher-cache":
            raise ValueError(f"{path}: not a teacher cache (write one with python -m siglip2.data.curation cache)")
        self.path = str(path)
        self.keys: list[str] = list(raw["keys"])
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.image_emb, self.text_emb = raw["image_emb"].float(), raw["text_emb"].float()
        self.logit_scale, self.logit_bias = raw["logit_scale"].float(), raw["logit_bias"].float()
        self.teacher: dict[str, Any] = dict(raw["teacher"])
        self.image_size, self.text_length = int(raw["image_size"]), int(raw["text_length"])
        self.draft_decode = bool(raw.get("draft_decode", True))
        tok = raw.get("tokenizer")
        self.tokenizer: dict[str, Any] | None = tok if isinstance(tok, dict) else None  # path + sha256

    def lookup(self, keys: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [k for k in keys if k not in self.row]
        if missing:
            raise KeyError(f"{len(missing)} of {len(keys)} samples are not in the teacher cache {self.path} "
                           f"(e.g. {missing[:3]}): it was built from other shards")
        rows = torch.tensor([self.row[k] for k in keys])
        return self.image_emb[rows].to(device), self.text_emb[rows].to(device)


@torch.no_grad()
def build_teacher_cache(teacher_spec: str, urls, tokenizer_path: str, image_size: int | None, text_length: int,
                        out: str | Path, batch_size: int = 64, num_workers: int = 1, device: str = "cpu",
                        lowercase: bool = True, draft_decode: bool = True) -> Path:
    """Encode every sample of `urls` once with the teacher: each image decoded and squashed to
    `image_size` px (None: the teacher's own resolution, as it was trained; not the learner's
    pixels resized again), the caption as the learner's `text_length` ids; write a
    `TeacherCache` file.
    `draft_decode` must match the run's `data.draft_decode` (JPEG decoding at a reduced
    scale changes the pixels). Duplicate sample keys are an error (the cache is looked up by key)."""
    from siglip2.data.samples import TrainSample
    from siglip2.data.shards import build_eval_loader
    from siglip2.data.tokenizer import build_tokenizer, tokenizer_fingerprint
    from siglip2.data.transforms import ImageTransform
    from siglip2.eval.precision import eval_precision, tower_autocast

    teacher, record = load_teacher(teacher_spec)
    teacher.to(device)
    tok = build_tokenizer(tokenizer_path, length=int(text_length), lowercase=lowercase)
    if tok.vocab_size != teacher.config.text.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens, the teacher {teacher_spec} "
                         f"{teacher.config.text.vocab_size}")
    image_size = int(image_size or teacher.config.vision.image_size)
    transform = ImageTransform(image_size)
    sample_fn = TrainSample(tok, transform, seed=0, epoch=0, locca=None)
    loader = build_eval_loader(urls, sample_fn, batch_size=batch_size, num_workers=num_workers,
                               decode_size=transform.min_source_size() if draft_decode else None)
    keys, images, texts = [], [], []
    with eval_precision(device):  # CUDA: bf16 towers, TF32 matmuls; CPU: fp32 (as evaluation)
        for batch in loader:
            image, text = teacher_inputs(teacher.config, batch["image"].to(device), batch["text"].to(device),
                                         tok.pad_id, tok.eos_id)
            with tower_autocast(device):
                images.append(teacher.encode_image(image=image).embeds.float().cpu())
                texts.append(teacher.embed_text(text).float().cpu())
            keys += list(batch["key"])
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise ValueError(f"duplicate sample keys in {urls} (e.g. {dup}): a teacher cache needs unique keys")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"kind": "siglip2-teacher-cache", "keys": keys, "image_emb": torch.cat(images),
                "text_emb": torch.cat(texts), "logit_scale": teacher.logit_scale.exp().detach().cpu(),
                "logit_bias": teacher.logit_bias.detach().cpu(), "teacher": record,
                "image_size": int(image_size), "text_length": int(text_length),
                "tokenizer": {**tokenizer_fingerprint(tokenizer_path), "vocab_size": int(tok.vocab_size)},
                "draft_decode": bool(draft_decode)}, tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m siglip2.data.curation",
                                 description="ACID's frozen teacher: precompute its embeddings of a shard set")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="write the teacher's embeddings of every sample, by key")
    c.add_argument("--teacher", required=True, help="our checkpoint or hf:<Siglip2Model folder>")
    c.add_argument("--shards", required=True, help="the training shard pattern (data.train)")
    c.add_argument("--tokenizer", required=True, help="the run's tokenizer (.model file or folder)")
    c.add_argument("--image-size", type=int, default=None,
                   help="the size the teacher sees each image at (default: its own model.vision.image_size)")
    c.add_argument("--text-length", type=int, required=True, help="the learner's text length (model.text.max_len)")
    c.add_argument("--out", required=True)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--num-workers", type=int, default=1)
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-draft-decode", action="store_true", help="the run sets data.draft_decode=false")
    args = ap.parse_args(argv)
    path = build_teacher_cache(args.teacher, args.shards, args.tokenizer, args.image_size, args.text_length,
                               args.out, args.batch_size, args.num_workers, args.device,
                               draft_decode=not args.no_draft_decode)
    cache = TeacherCache(path)
    print(f"teacher cache: {len(cache.keys)} samples -> {path}")


if __name__ == "__main__":
    from siglip2.cli import user_errors

    with user_errors("python -m siglip2.data.curation"):
        main()
