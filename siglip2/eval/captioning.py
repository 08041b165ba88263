"""Greedy captioning with the LocCa decoder, and a word-match check of what a caption names.

The demo data draws coloured shapes, so "does the caption name this object" is a fair,
cheap correctness signal for a small decoder: both its colour and its shape word appear.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from siglip2.data.locca_targets import LoccaFormat, prompt_ids


@torch.no_grad()
def generate_captions(decoder, image_tokens: torch.Tensor, image_mask: torch.Tensor | None, tokenizer,
                      prefix_text: str = LoccaFormat.cap_prompt, max_len: int = 32) -> list[str]:
    """One greedy caption per image after the Cap prompt (the one used in training).

    ``max_len`` caps the new tokens (also by the decoder's positions left after the prompt).
    """
    ids = prompt_ids(tokenizer, prefix_text)
    prefix = torch.tensor(ids, dtype=torch.long, device=image_tokens.device).expand(image_tokens.shape[0], -1)
    new = min(max_len, decoder.max_len - len(ids) + 1)
    out = decoder.generate(image_tokens, image_mask, prefix, new, tokenizer.eos_id, pad_id=tokenizer.eos_id)
    return [tokenizer.decode(row) for row in out.tolist()]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def caption_names_object(caption: str, shape: str, color: str) -> bool:
    """True when the caption contains the colour word and the shape word (or its plural),
    as whole words: "a red circle" names (circle, red); "reddish circles" does not name red."""
    words = set(_words(caption))
    shape, color = shape.lower(), color.lower()
    return color in words and (shape in words or shape + "s" in words or shape + "es" in words)


def caption_correctness(captions: Sequence[str], objects: Sequence[Sequence[Mapping]]) -> float:
    """Fraction of captions that name at least one object of their image (``objects`` per
    image: the demo json's ``[{"shape": ..., "color": ...}, ...]``)."""
    if len(captions) != len(objects) or not captions:
        raise ValueError("need one non-empty list of objects per caption, and at least one caption")
    hits = [any(caption_names_object(c, o["shape"], o["color"]) for o in objs) for c, objs in zip(captions, objects)]
    return sum(hits) / len(hits)
