"""One demo sample: a scene of glyphs (:mod:`.glyphs`) with its captions (:mod:`.languages`),
region captions, boxes and per-pixel glyph-class mask, as :func:`generate_sample` returns it."""

from __future__ import annotations

import math

import numpy as np

from .glyphs import DEMO_STYLE, LETTERS, WORD_LAYOUTS, WORDS, _font_paths, draw_glyph_scene, draw_word, glyph_scene_size
from .world import COLORS
from .languages import _EN_FRACTION, _OTHER_LANGS, LANGS, OMITTABLE, describe

SHAPE = "letter"  # the kind of object a glyph is; captions' noun
WORD = "word"  # the noun of an elongated image's word
WORD_ASPECT = (2.0, 4.0)  # row and column words: aspect log-uniform in this range
WORD_SHORT = (40, 96)  # px: a word image's short side (a grid's cell)
_MAX_ASPECT = 2.0
_MAX_CANVASES = 200  # 2 glyphs need a few canvases; 3 at these sizes seldom fit, 4 never


def generate_sample(
    rng: np.random.Generator,
    n_objects: int,
    force: dict[str, str] | None = None,
    lang: str | None = None,
    n_captions: int = 1,
    omit_prob: float = 0.0,
    colors: tuple[str, ...] | None = None,
) -> dict:
    """One scene: ``{"image": PIL, "mask": uint8 array, "captions": [...], "meta": json dict}``.

    ``n_objects`` glyphs (letters of ``LETTERS``) in distinct colours, pastel on black, on a
    canvas whose short side is 64-160 px at aspect 1:2 to 2:1. ``force``: ``{"category": "K"}``
    draws every glyph as that letter. ``omit_prob``: for English captions, the chance, drawn
    for size and for colour on its own, that those words are left out of a caption ("a photo of
    a letter K", "a red letter K"); the letter is always named. Region captions keep every
    word, so that each names exactly one glyph. ``colors``: the palette colours the glyphs may
    take (None: any; the fairness sets draw attribute colours or the others). Raises ``ValueError`` for a letter outside
    ``LETTERS``, and when ``n_objects`` glyphs do not fit on any of 200 canvases drawn.
    """
    force = dict(force or {})
    bad = {k: v for k, v in force.items() if k != "category" or v not in LETTERS}
    if bad:
        raise ValueError(f"force takes {{'category': one of {''.join(LETTERS)}}}, got {bad}")
    if lang is None:
        lang = "en" if rng.random() < _EN_FRACTION else _OTHER_LANGS[rng.integers(len(_OTHER_LANGS))]
    for _ in range(_MAX_CANVASES):  # the canvas may be too small for n glyphs: draw a new one
        w, h = glyph_scene_size(rng, max_aspect=_MAX_ASPECT)
        img, mask, glyphs = draw_glyph_scene(rng, w, h, n_objects, force.get("category"), colors=colors, **DEMO_STYLE)
        if len(glyphs) == n_objects:
            break
    else:
        raise ValueError(
            f"{n_objects} glyphs did not fit on any of {_MAX_CANVASES} canvases (aspect up to "
            f"{_MAX_ASPECT:g}:1); the demo draws 1 or 2"
        )
    L = LANGS[lang]
    triples = [(SHAPE, g.color, g.size, g.glyph) for g in glyphs]
    boxes = [g.box for g in glyphs]
    captions: list[str] = []
    for _ in range(200):
        omit = (False,) * len(OMITTABLE)
        if omit_prob > 0 and lang == "en":  # size and colour; the letter and its noun always stay
            omit = tuple(bool(rng.random() < omit_prob) for _ in OMITTABLE[:2]) + (False, False)
        c = describe(triples, boxes, lang, rng, omit)
        if c not in captions:
            captions.append(c)
        if len(captions) == n_captions:
            break
    meta = {
        "lang": lang,
        "width": w,
        "height": h,
        # boxes: normalised tight pixel edges of each glyph's ink
        "regions": [
            {
                "caption": L.region(t),
                "box": [round(b[0] / w, 6), round(b[1] / h, 6), round(b[2] / w, 6), round(b[3] / h, 6)],
            }
            for t, b in zip(triples, boxes)
        ],
        "objects": [
            {
                "category": g.glyph,
                "shape": SHAPE,
                "color": g.color,
                "size": g.size,
                "font": g.font,
                "class_id": LETTERS.index(g.glyph),
            }
            for g in glyphs
        ],
    }
    return {"image": img, "mask": mask, "captions": captions, "meta": meta}


def generate_word_sample(
    rng: np.random.Generator,
    layout: str,
    force: dict[str, str] | None = None,
    lang: str | None = None,
    n_captions: int = 1,
    omit_prob: float = 0.0,
) -> dict:
    """One word image (issue 28's elongated images): a word of ``WORDS`` in one colour, as
    :func:`generate_sample` returns a scene.

    ``layout``: ``"row"`` (aspect 2:1 to 4:1, read left to right), ``"column"`` (1:2 to 1:4,
    read top to bottom) or ``"grid"`` (square, 2 x 2 letters read row by row), see
    ``glyphs.draw_word``; short side (a grid's cell) 40-96 px. The random draws do not depend
    on the layout: the same generator state gives the same word, colour, font, size and
    letter jitter in every layout (the eval sets ``words`` and ``words_square`` rely on it).
    ``force``: ``{"word": "MOST"}``. ``omit_prob``: for English captions, the chance that the
    colour is left out ("a photo of a word MOST"); the word is always named.

    The caption names the word and its colour; ``meta["objects"]`` and ``meta["regions"]``
    are the word's letters (one region caption per letter, no size word: "red letter M"),
    ``meta["word"]`` the word, its layout and its box. Raises ``ValueError`` for a word outside
    ``WORDS`` or an unknown layout.
    """
    force = dict(force or {})
    bad = {k: v for k, v in force.items() if k != "word" or v not in WORDS}
    if bad:
        raise ValueError(f"force takes {{'word': one of {WORDS}}}, got {bad}")
    if layout not in WORD_LAYOUTS:
        raise ValueError(f"layout must be one of {WORD_LAYOUTS}, got {layout!r}")
    if lang is None:
        lang = "en" if rng.random() < _EN_FRACTION else _OTHER_LANGS[rng.integers(len(_OTHER_LANGS))]
    word = force.get("word") or WORDS[int(rng.integers(len(WORDS)))]
    color = [c for c in COLORS if c != "black"][int(rng.integers(len(COLORS) - 1))]
    fonts = _font_paths()[: DEMO_STYLE["num_fonts"]]
    font = fonts[int(rng.integers(len(fonts)))]
    short = int(rng.integers(WORD_SHORT[0], WORD_SHORT[1] + 1))
    aspect = math.exp(rng.uniform(*np.log(WORD_ASPECT)))
    img, mask, glyphs = draw_word(rng, word, layout, short, aspect, color, font, ink=DEMO_STYLE["ink"])
    w, h = img.size
    L = LANGS[lang]
    box = (
        min(g.box[0] for g in glyphs),
        min(g.box[1] for g in glyphs),
        max(g.box[2] for g in glyphs),
        max(g.box[3] for g in glyphs),
    )
    captions: list[str] = []
    for _ in range(200):
        omit = (False,) * len(OMITTABLE)
        if omit_prob > 0 and lang == "en":
            omit = (False, bool(rng.random() < omit_prob), False, False)
        c = describe([(WORD, color, "", word)], [box], lang, rng, omit)
        if c not in captions:
            captions.append(c)
        if len(captions) == n_captions:
            break

    def norm(b):
        return [round(b[0] / w, 6), round(b[1] / h, 6), round(b[2] / w, 6), round(b[3] / h, 6)]

    meta = {
        "lang": lang,
        "width": w,
        "height": h,
        "regions": [{"caption": L.region((SHAPE, color, "", g.glyph)), "box": norm(g.box)} for g in glyphs],
        "objects": [
            {
                "category": g.glyph,
                "shape": SHAPE,
                "color": color,
                "size": "",
                "font": g.font,
                "class_id": LETTERS.index(g.glyph),
            }
            for g in glyphs
        ],
        "word": {
            "text": word,
            "layout": layout,
            "color": color,
            "caption": L.region((WORD, color, "", word)),
            "box": norm(box),
        },
    }
    return {"image": img, "mask": mask, "captions": captions, "meta": meta}
