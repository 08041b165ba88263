"""Referring expressions as SigLIP 2 measures them: a fresh decoder on a frozen encoder.

Source: SigLIP 2 paper, Table 5 (RefCOCO / RefCOCO+ / RefCOCOg acc@0.5), whose numbers come
from the frozen image tower with a LocCa-style decoder trained for the task (LocCa,
arXiv 2403.19596, its transfer protocol); this is the only way to score a model without a
LocCa decoder of its own (an ``hf:`` import, SigLIP v1, a run with ``stage.losses.locca=null``).
The decoder's size, budget and optimiser used there are **not published**; the defaults below
are ours, every one a field of :class:`RefexpProbeConfig` (``eval.refexp_probe``).

- **Split**: by sample key, :func:`siglip2.eval.dense_probe.is_train_key` (``train_fraction``
  0.5): the same rule and the same images as the dense probe uses on a set.
- **Features**: the frozen tower's un-pooled ``tokens`` (and NaFlex ``token_mask``), computed
  once per image, no gradient.
- **Decoder**: a fresh :class:`~siglip2.model.decoder.LoccaDecoder` (big_vision CapPa's
  initialisation) of the model's own LocCa shape by default: the text tower's width, heads and
  MLP, half its depth; its vocabulary and length are the tokenizer's.
- **Task**: ARef exactly as pretraining writes it (``aref: <expression> box:`` -> ``x1 y1 x2
  y2`` in ``bins`` integers + EOS; :mod:`siglip2.data.locca_targets`), teacher-forced
  cross-entropy on the box tokens, every region of every training image one example.
- **Training**: ``steps`` AdamW steps of ``batch_size`` examples (epochs of a permutation from
  a generator seeded with ``seed``), lr linear warmup over ``warmup`` of the steps then cosine
  to 0. Under DDP every rank trains on the gathered examples and rank 0's weights are
  broadcast.
- **Scoring**: greedy decoding of a box per held-out region (:func:`siglip2.eval.refexp.predict_boxes`),
  hit at IoU >= 0.5 (unparseable = miss), summed over ranks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from siglip2 import distributed as dist_utils
from siglip2.data.boxes import box_to_text
from siglip2.data.locca_targets import IGNORE, LoccaFormat, encode_example, prompt_ids, prompt_text
from siglip2.eval.refexp import predict_boxes, refexp_accuracy
from siglip2.model.decoder import LoccaDecoder

__all__ = ["RefexpProbeConfig", "aref_examples", "train_refexp_decoder", "score_refexp"]

log = logging.getLogger(__name__)


@dataclass
class RefexpProbeConfig:
    """The probe's decoder and budget (``eval.refexp_probe``: null = off). ``width``, ``depth``,
    ``heads``, ``mlp_dim``: None = the model's LocCa shape (text tower's width, heads, MLP; half
    its depth, at least 1). ``bins``: box quantisation (pretraining's
    ``stage.losses.locca.targets.bins``, 500)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.1
    train_fraction: float = 0.5
    seed: int = 0
    bins: int = 500
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> "RefexpProbeConfig":
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"eval.refexp_probe: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**spec)
        if cfg.steps < 1 or cfg.batch_size < 1 or not 0 < cfg.train_fraction < 1 or not 0 <= cfg.warmup < 1:
            raise ValueError(
                f"eval.refexp_probe: steps and batch_size >= 1, train_fraction in (0, 1), warmup in [0, 1); got {cfg}"
            )
        return cfg


def aref_examples(
    tokenizer, captions: list[str], boxes: list, fmt: LoccaFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ARef (input, target) rows, (m, max_len) int64, as pretraining builds them, and the (m,)
    bool of which regions gave one (a box whose prompt and target do not fit is left out)."""
    inputs, targets, kept = [], [], []
    for caption, box in zip(captions, boxes):
        target = tokenizer.encode(box_to_text(torch.as_tensor(box, dtype=torch.float32), fmt.bins), add_eos=True)
        e = encode_example(
            prompt_ids(tokenizer, prompt_text("aref", fmt, caption=caption)),
            target,
            fmt.max_len,
            tokenizer.pad_id,
            truncate=False,
        )
        kept.append(e is not None)
        if e is not None:
            inputs.append(e[0])
            targets.append(e[1])
    if not inputs:
        empty = torch.zeros(0, fmt.max_len, dtype=torch.long)
        return empty, empty.clone(), torch.tensor(kept, dtype=torch.bool)
    return torch.stack(inputs), torch.stack(targets), torch.tensor(kept, dtype=torch.bool)


def _decoder_shape(model, cfg: RefexpProbeConfig, vocab_size: int, max_len: int) -> dict[str, int]:
    t, v = model.config.text, model.config.vision
    return dict(
        width=cfg.width or t.width,
        depth=cfg.depth or max(1, round(t.depth * 0.5)),
        heads=cfg.heads or t.heads,
        mlp_dim=cfg.mlp_dim or t.mlp_dim,
        vocab_size=vocab_size,
        max_len=max_len,
        image_width=v.width,
    )


def train_refexp_decoder(
    shape: dict[str, int],
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None,
    image_index: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    cfg: RefexpProbeConfig,
) -> LoccaDecoder:
    """A fresh decoder of ``shape`` (:class:`LoccaDecoder` arguments) trained on ARef rows
    ``inputs`` / ``targets`` (m, L), example i reading image ``image_index[i]`` of ``tokens``
    (n, N, W) (``token_mask`` (n, N) bool or None), on ``tokens.device``; returned in eval mode.
    Raises ValueError without an example."""
    m = inputs.shape[0]
    if m == 0:
        raise ValueError("the refexp probe has no training region")
    device = tokens.device
    with torch.random.fork_rng(devices=[]):  # the probe's own initialisation, global RNG untouched
        torch.manual_seed(int(cfg.seed))
        decoder = LoccaDecoder(**shape)
    decoder.to(device).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * cfg.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    bs = min(cfg.batch_size, m)
    order, pos = torch.randperm(m, generator=gen), 0
    inputs, targets, image_index = inputs.to(device), targets.to(device), image_index.to(device)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            if pos + bs > m:
                order, pos = torch.randperm(m, generator=gen), 0
            idx = order[pos : pos + bs].to(device)
            pos += bs
            img = image_index[idx]
            hidden = decoder(inputs[idx], tokens[img].float(), None if token_mask is None else token_mask[img])
            tgt = targets[idx]
            sel = tgt != IGNORE
            loss = F.cross_entropy(decoder.logits(hidden[sel]).float(), tgt[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return decoder.eval()


@torch.no_grad()
def score_refexp(
    decoder,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None,
    image_index: torch.Tensor,
    tokenizer,
    captions: list[str],
    boxes: list,
    fmt: LoccaFormat,
    chunk: int = 256,
) -> tuple[float, int]:
    """(hits, regions) of greedy ARef decoding at IoU >= 0.5; region i reads image
    ``image_index[i]`` of ``tokens`` (n, N, W)."""
    hits = 0.0
    for start in range(0, len(captions), chunk):
        img = image_index[start : start + chunk].to(tokens.device)
        mask = None if token_mask is None else token_mask[img]
        pred = predict_boxes(decoder, tokens[img].float(), mask, tokenizer, captions[start : start + chunk], fmt)
        hits += refexp_accuracy(pred, boxes[start : start + chunk]) * len(pred)
    return hits, len(captions)


def run_refexp_probe(
    model, rows: list[dict[str, Any]], tokenizer, device, cfg: RefexpProbeConfig, own_decoder=None
) -> dict[str, float]:
    """The probe on one rank's share of a refexp set: ``rows`` one per image, ``tokens`` (N, W),
    ``token_mask`` (N,) or None, ``key``, ``regions`` (json ``caption`` + normalised ``box``).
    Returns ``probe_acc@0.5`` (held-out regions), the region counts and, when the model has a
    LocCa decoder (``own_decoder``), ``probe_own_decoder_acc@0.5`` on the same held-out regions
    (beside the whole-set ``acc@0.5``); {} with a warning when a side is empty."""
    from siglip2.eval.dense_probe import is_train_key

    start = time.perf_counter()
    fmt = LoccaFormat(max_len=int(model.config.text.max_len), bins=int(cfg.bins))
    width = int(model.config.vision.width)
    # one token grid per image (regions point at it), the same length and a mask on every rank:
    # a rank with no image (a set of fewer shards than ranks) still joins every collective
    shapes = dist_utils.all_gather_object(
        (max((int(r["tokens"].shape[0]) for r in rows), default=0), any(r["token_mask"] is not None for r in rows))
    )
    n_tok = max(n for n, _ in shapes)
    masked = any(m for _, m in shapes) or len({n for n, _ in shapes if n}) > 1
    sides = {side: {"tok": [], "mask": [], "img": [], "cap": [], "box": []} for side in (True, False)}
    for row in rows:
        side = sides[is_train_key(row["key"], cfg.train_fraction)]
        t = row["tokens"]
        m = (
            row["token_mask"]
            if row["token_mask"] is not None
            else torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
        )
        if t.shape[0] < n_tok:  # pad to the common length, padding masked out
            t = torch.cat([t, t.new_zeros(n_tok - t.shape[0], t.shape[1])])
            m = torch.cat([m, m.new_zeros(n_tok - m.shape[0])])
        side["tok"].append(t)
        side["mask"].append(m.bool())
        for region in row["regions"]:
            side["img"].append(len(side["tok"]) - 1)
            side["cap"].append(str(region["caption"]))
            side["box"].append(list(region["box"]))

    def stacked(side):
        # float32 on every rank: a rank with no image must send what the others send
        tok = (
            torch.stack(side["tok"]).float().to(device) if side["tok"] else torch.zeros(0, n_tok, width, device=device)
        )
        msk = (
            torch.stack(side["mask"]).to(device)
            if side["tok"]
            else torch.zeros(0, n_tok, dtype=torch.bool, device=device)
        )
        return tok, msk

    train, test = sides[True], sides[False]
    inputs, targets, kept = aref_examples(tokenizer, train["cap"], train["box"], fmt)
    index = torch.tensor([i for i, k in zip(train["img"], kept.tolist()) if k], dtype=torch.long, device=device)
    tok, msk = stacked(train)
    counts = dist_utils.all_reduce_sum(torch.tensor([float(index.numel()), float(len(test["cap"]))], device=device))
    if counts[0] == 0 or counts[1] == 0:
        log.warning("refexp probe skipped: %d training and %d held-out regions", int(counts[0]), int(counts[1]))
        return {}
    offset = sum(dist_utils.all_gather_object(int(tok.shape[0]))[: dist_utils.get_rank()])
    tok, msk = dist_utils.all_gather_variable(tok), dist_utils.all_gather_variable(msk.to(torch.uint8)).bool()
    index = dist_utils.all_gather_variable(index + offset)
    inputs, targets = (
        dist_utils.all_gather_variable(inputs.to(device)),
        dist_utils.all_gather_variable(targets.to(device)),
    )
    decoder = train_refexp_decoder(
        _decoder_shape(model, cfg, tokenizer.vocab_size, fmt.max_len),
        tok,
        msk if masked else None,
        index,
        inputs,
        targets,
        cfg,
    )
    del tok, msk
    if dist_utils.is_distributed():
        for t in decoder.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    test_tok, test_msk = stacked(test)
    test_index = torch.tensor(test["img"], dtype=torch.long, device=device)
    out = torch.zeros(3, device=device)
    if test["cap"]:
        mask = test_msk if masked else None
        out[0], out[1] = score_refexp(decoder, test_tok, mask, test_index, tokenizer, test["cap"], test["box"], fmt)
        if own_decoder is not None:
            out[2] = score_refexp(
                own_decoder,
                test_tok,
                mask,
                test_index,
                tokenizer,
                test["cap"],
                test["box"],
                LoccaFormat(max_len=own_decoder.max_len),
            )[0]
    out = dist_utils.all_reduce_sum(out)
    res = {
        "probe_acc@0.5": float(out[0] / out[1].clamp_min(1)),
        "probe_num_train_regions": float(counts[0]),
        "probe_num_test_regions": float(out[1]),
    }
    if own_decoder is not None:
        res["probe_own_decoder_acc@0.5"] = float(out[2] / out[1].clamp_min(1))
    log.info(
        "refexp probe: %d training and %d held-out regions, %d steps, %.1f s",
        int(counts[0]),
        int(out[1]),
        cfg.steps,
        time.perf_counter() - start,
    )
    return res
