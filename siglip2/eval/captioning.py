"""Greedy captioning with the LocCa decoder, and a word-match check of what a caption names.

The demo data draws coloured, patterned objects, so "does the caption name this object" is a
fair, cheap correctness signal for a small decoder: both its colour and its category word
(or, for data without categories, its shape word) appear.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from siglip2.data.locca_targets import LoccaFormat, prompt_ids


@torch.no_grad()
def generate_captions(
    decoder,
    image_tokens: torch.Tensor,
    image_mask: torch.Tensor | None,
    tokenizer,
    prefix_text: str = LoccaFormat.cap_prompt,
    max_len: int = 32,
) -> list[str]:
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


def caption_names_object(caption: str, name: str, color: str) -> bool:
    """True when the caption contains the colour word and the name (a category such as the
    demo's letter "K" or format 3's "striped", or a shape, or its plural) as whole words: "a red striped circle" names
    (striped, red) and (circle, red); "reddish circles" does not name red."""
    words = set(_words(caption))
    name, color = name.lower(), color.lower()
    return color in words and (name in words or name + "s" in words or name + "es" in words)


def object_name(obj: Mapping) -> str:
    """What a caption must name about an object: its category when the data has one (the
    demo's json), else its shape."""
    return obj.get("category") or obj["shape"]


def caption_correctness(captions: Sequence[str], objects: Sequence[Sequence[Mapping]]) -> float:
    """Fraction of captions that name at least one object of their image by colour and
    category (``objects`` per image: the demo json's ``[{"category": ..., "color": ...}, ...]``)."""
    if len(captions) != len(objects) or not captions:
        raise ValueError("need one non-empty list of objects per caption, and at least one caption")
    hits = [
        any(caption_names_object(c, object_name(o), o["color"]) for o in objs) for c, objs in zip(captions, objects)
    ]
    return sum(hits) / len(hits)
