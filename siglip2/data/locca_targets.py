"""Per-sample LocCa decoder inputs and targets: Cap, ARef and GCap [P §2.2].

Built in the data pipeline from the caption and the sample json's ``regions``
(``[{"caption": str, "box": [x1, y1, x2, y2]}]``, normalised, already moved by the image's
geometric transforms: pass the transformed boxes as ``boxes``).

Each task is a text prompt followed by a target text (**not published** in SigLIP 2; our
default, configurable through ``LoccaFormat``):
  Cap   ``caption:``                        -> the alt-text
  ARef  ``aref: <region caption> box:``     -> ``x1 y1 x2 y2`` (500-bin integers)
  GCap  ``gcap: <x1 y1 x2 y2> caption:``    -> the region caption
Prompt and target are encoded separately (prompt without EOS, target with EOS) and joined:
``seq = prompt + target``. The decoder reads ``seq[:-1]`` and at position i predicts
``seq[i + 1]``; the loss applies only where that next token belongs to the target, so the
prompt is input only, and its first token plays the role of BOS (an empty prompt becomes a
single pad token). At eval the same prompt ids start greedy decoding (``prompt_ids``).

Per sample one region is drawn for ARef and, independently, one for GCap with the rng passed
in; samples without usable regions train Cap only. Output (fixed length ``max_len``):
``locca_{t}_input`` (pad-filled), ``locca_{t}_target`` (-100 where no loss),
``locca_{t}_valid`` (bool scalar) for t in cap, aref, gcap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from siglip2.data.boxes import DEFAULT_BINS, as_boxes, box_to_text, boxes_valid

IGNORE = -100
TASKS = ("cap", "aref", "gcap")


@dataclass(frozen=True)
class LoccaFormat:
    """Prompt templates (``{caption}``, ``{box}`` placeholders), box bins, sequence length."""

    max_len: int = 64
    bins: int = DEFAULT_BINS
    cap_prompt: str = "caption:"
    aref_prompt: str = "aref: {caption} box:"
    gcap_prompt: str = "gcap: {box} caption:"


def prompt_text(task: str, fmt: LoccaFormat = LoccaFormat(), caption: str = "", box=None) -> str:
    """The prompt of ``task``: ARef takes the region caption, GCap the (normalised) box."""
    if task == "cap":
        return fmt.cap_prompt
    if task == "aref":
        return fmt.aref_prompt.format(caption=caption)
    if task == "gcap":
        return fmt.gcap_prompt.format(box=box_to_text(box, fmt.bins))
    raise ValueError(f"unknown LocCa task {task!r}")


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Prompt token ids, no EOS; an empty prompt is one pad token so decoding has a start."""
    return tokenizer.encode(text, add_eos=False) or [tokenizer.pad_id]


def encode_example(
    prompt: list[int], target: list[int], max_len: int, pad_id: int, truncate: bool = True
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(input, target) LongTensors of length ``max_len`` for ``prompt + target``, or None when
    it does not fit: too long and ``truncate=False`` (boxes must be whole), or no target token
    left after truncation."""
    seq = list(prompt) + list(target)
    if len(seq) - 1 > max_len:
        if not truncate:
            return None
        seq = seq[: max_len + 1]
    if len(seq) <= len(prompt):
        return None
    if not prompt:
        raise ValueError("the prompt needs at least one token (its first plays BOS)")
    n = len(seq) - 1
    first = len(prompt) - 1  # position whose next token is the first target token
    # Built as lists, one tensor each: this runs three times per training sample.
    inp = seq[:-1] + [pad_id] * (max_len - n)
    tgt = [IGNORE] * first + seq[len(prompt) :] + [IGNORE] * (max_len - n)
    return torch.tensor(inp, dtype=torch.long), torch.tensor(tgt, dtype=torch.long)


def region_boxes(regions) -> torch.Tensor:
    """(K, 4) boxes of the json regions, to send through the image transforms."""
    return as_boxes([r["box"] for r in regions or []])


def _randint(rng, n: int) -> int:
    if isinstance(rng, torch.Generator):
        return int(torch.randint(n, (1,), generator=rng))
    if hasattr(rng, "integers"):  # numpy Generator
        return int(rng.integers(n))
    return (rng or random).randrange(n)


def _usable_regions(regions, boxes) -> list[tuple[str, torch.Tensor]]:
    """(caption, box) pairs with a non-empty caption and a box of positive size; malformed
    json entries are skipped rather than failing the sample."""
    regions = regions or []
    if isinstance(boxes, torch.Tensor) and boxes.shape == (len(regions), 4):
        # transformed boxes, one row per region: check all sizes at once
        ok = boxes_valid(boxes).tolist()
        return [
            (r.get("caption").strip(), boxes[i])
            for i, r in enumerate(regions)
            if ok[i] and isinstance(r, dict) and isinstance(r.get("caption"), str) and r["caption"].strip()
        ]
    out = []
    for i, r in enumerate(regions):
        try:
            cap = r.get("caption")
            box = as_boxes(r["box"] if boxes is None else boxes[i])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError):
            continue
        if isinstance(cap, str) and cap.strip() and box.shape == (1, 4) and bool(boxes_valid(box)[0]):
            out.append((cap.strip(), box[0]))
    return out


@dataclass(frozen=True)
class LoccaRequest:
    """One task of one sample before tokenisation: prompt and target texts; `truncate`: may
    the target be cut to fit `max_len` (not for boxes, which must stay whole)."""

    task: str
    prompt: str
    target: str
    truncate: bool = True


def locca_requests(
    caption: str, regions=None, rng=None, fmt: LoccaFormat = LoccaFormat(), boxes=None
) -> list[LoccaRequest]:
    """The texts of one sample's LocCa tasks (Cap if it has a caption; ARef and GCap on a
    region each, drawn with ``rng``, if it has usable regions). Tokenised later, per batch,
    by :func:`encode_locca`; :func:`build_locca_targets` is both for one sample."""
    out = []
    if isinstance(caption, str) and caption.strip():
        out.append(LoccaRequest("cap", prompt_text("cap", fmt), caption))
    usable = _usable_regions(regions, boxes)
    if usable:
        cap, box = usable[_randint(rng, len(usable))]
        out.append(
            LoccaRequest("aref", prompt_text("aref", fmt, caption=cap), box_to_text(box, fmt.bins), truncate=False)
        )
        cap, box = usable[_randint(rng, len(usable))]
        out.append(LoccaRequest("gcap", prompt_text("gcap", fmt, box=box), cap))
    return out


def encode_locca(
    tokenizer, requests: list[list[LoccaRequest]], fmt: LoccaFormat = LoccaFormat()
) -> dict[str, torch.Tensor]:
    """Batched ``locca_*`` tensors of B samples' requests: ``locca_{t}_input`` and
    ``locca_{t}_target`` (B, max_len) int64, ``locca_{t}_valid`` (B,) bool, for t in cap,
    aref, gcap. All prompts and all targets are encoded in two calls of
    ``tokenizer.encode_batch``."""
    flat = [(i, r) for i, reqs in enumerate(requests) for r in reqs]
    prompts = _encode_all(tokenizer, [r.prompt for _, r in flat], add_eos=False)
    targets = _encode_all(tokenizer, [r.target for _, r in flat], add_eos=True)
    L, pad, b = fmt.max_len, tokenizer.pad_id, len(requests)
    out = {}
    for t in TASKS:
        out[f"locca_{t}_input"] = torch.full((b, L), pad, dtype=torch.long)
        out[f"locca_{t}_target"] = torch.full((b, L), IGNORE, dtype=torch.long)
        out[f"locca_{t}_valid"] = torch.zeros(b, dtype=torch.bool)
    for (i, r), prompt, target in zip(flat, prompts, targets):
        e = encode_example(prompt or [pad], target, L, pad, truncate=r.truncate)
        if e is not None:
            out[f"locca_{r.task}_input"][i], out[f"locca_{r.task}_target"][i] = e
            out[f"locca_{r.task}_valid"][i] = True
    return out


def _encode_all(tokenizer, texts: list[str], add_eos: bool) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts, add_eos=add_eos)
    return [tokenizer.encode(t, add_eos=add_eos) for t in texts]  # a tokenizer with only encode()


def build_locca_targets(
    tokenizer, caption: str, regions=None, rng=None, fmt: LoccaFormat = LoccaFormat(), boxes=None
) -> dict[str, torch.Tensor]:
    """The ``locca_*`` tensors of one sample (``locca_{t}_input``/``_target`` (max_len,),
    ``locca_{t}_valid`` a bool scalar).

    tokenizer: ``encode_batch(texts, add_eos)`` (or ``encode(text, add_eos)``), ``pad_id``, ``eos_id`` (docs/INTERFACES.md).
    regions: the json ``regions``; boxes: optional (K, 4) transformed boxes replacing theirs.
    rng: ``random.Random``, ``numpy.random.Generator`` or ``torch.Generator`` (seeded by caller).
    """
    batch = encode_locca(tokenizer, [locca_requests(caption, regions, rng, fmt, boxes)], fmt)
    return {k: v[0] for k, v in batch.items()}
