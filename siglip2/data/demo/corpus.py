"""The demo tokenizer's training text: the train captions plus what else it must cover.

The 90/10 English / multilingual train captions and region captions, numbers (LocCa writes
boxes as integers), the zero-shot prompts, a lexicon of every word form of every language,
and every character topped up so that SentencePiece keeps it (no byte fallback).
"""

from __future__ import annotations

import math

import numpy as np

from .glyphs import LETTER_SIZES, LETTERS, WORDS
from .languages import LANGS, WORD_TEMPLATES, ZEROSHOT_TEMPLATES
from .sample import SHAPE, WORD
from .world import COLORS


def _lexicon(lang: str, rng: np.random.Generator) -> list[str]:
    """Every word form and frame of a language in a few hundred sentences.

    Why: a non-English language is ~1% of the captions, so its rarer forms (a Russian
    instrumental, a Japanese prefix) would otherwise be split into characters or bytes.
    """
    L = LANGS[lang]
    objs = [(SHAPE, c, z, k) for k in LETTERS for c in COLORS for z in LETTER_SIZES]
    rels = [(r, t) for r, ts in L.rel.items() for t in ts]
    out = []
    for i, o in enumerate(objs):
        o2 = objs[rng.integers(len(objs))]
        r, t = rels[i % len(rels)]
        clause = t.format(a=L.np(o), b=L.np(o2, L.rel_case[r]))
        if i % 3 == 1:
            clause = L.also.format(x=clause, y=L.np(o2))
        elif i % 3 == 2:
            clause = L.join.format(x=clause, y=clause)
        out.append(L.prefixes[i % len(L.prefixes)].format(clause).lower())
        out.append(L.region(o).lower())
    for i, (w, c) in enumerate((w, c) for w in WORDS for c in COLORS):  # words and their letters (no size)
        out.append(L.prefixes[i % len(L.prefixes)].format(L.np((WORD, c, "", w))).lower())
        out.append(L.region((SHAPE, c, "", w[i % len(w)])).lower())
    return out


def _tokenizer_corpus(texts: list[str], rng: np.random.Generator) -> list[str]:
    """Captions and region captions, lower-cased as the tokenizer will see them, plus numbers
    (LocCa writes boxes as integers through this tokenizer), the zero-shot prompts and each
    language's lexicon. Then every character the demo can write is topped up, as one-character
    lines (which add no merges), to 0.2% of all characters: SentencePiece keeps only the
    characters that make up 99.95% of the text, and the rest would fall to byte fallback."""
    out = [t.lower() for t in texts]
    out += [" ".join(str(v) for v in rng.integers(0, 1000, size=4)) for _ in range(2000)]
    out += [t.format(c=c) for t in ZEROSHOT_TEMPLATES for c in LETTERS]
    out += [t.format(c=c).lower() for t in WORD_TEMPLATES for c in WORDS]
    for lang in LANGS:
        out += _lexicon(lang, rng)
    alphabet = {c for lang in LANGS for t in _lexicon(lang, rng) for c in t} | set("0123456789")
    alphabet |= {c for t in (*ZEROSHOT_TEMPLATES, *WORD_TEMPLATES) for c in t.replace("{c}", "")}
    counts: dict[str, int] = {}
    for t in out:
        for c in t:
            counts[c] = counts.get(c, 0) + 1
    need = math.ceil(0.002 * sum(counts.values()))
    for c in sorted(alphabet - {" "}):
        out += [c] * max(0, need - counts.get(c, 0))
    return out
