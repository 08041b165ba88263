"""One demo sample: a drawn scene (:mod:`.world`) with its captions (:mod:`.languages`),
region captions, boxes and class mask, as :func:`generate_sample` returns it."""

from __future__ import annotations

import numpy as np

from .languages import _EN_FRACTION, _OTHER_LANGS, LANGS, OMITTABLE, describe
from .world import CATEGORIES, SHAPES, _background, _draw, _image_size, _place


def generate_sample(rng: np.random.Generator, n_objects: int, force: dict[str, str] | None = None,
                    lang: str | None = None, n_captions: int = 1, omit_prob: float = 0.0) -> dict:
    """One scene: ``{"image": PIL, "mask": uint8 array, "captions": [...], "meta": json dict}``.

    ``force``: attributes every object takes (``{"category": "dotted"}`` or ``{"shape": "star"}``).
    ``omit_prob``: for English captions, the chance, drawn for each of size, colour, category
    and shape on its own, that those words are left out of a caption (the shape noun becomes
    "shape"). Region captions always keep every word, so that each names exactly one object.
    """
    force = dict(force or {})
    bad = {k: v for k, v in force.items()
           if v not in {"shape": SHAPES, "category": CATEGORIES}.get(k, ())}
    if bad:
        raise ValueError(f"force takes a known shape or category, got {bad}")
    if lang is None:
        lang = "en" if rng.random() < _EN_FRACTION else _OTHER_LANGS[rng.integers(len(_OTHER_LANGS))]
    while True:  # a crowded small image can fail to fit n objects: draw a new canvas
        w, h = _image_size(rng)
        bg, _ = _background(rng, w, h)
        objs = _place(rng, w, h, n_objects, force, bg)
        if len(objs) == n_objects:
            break
    img, mask = _draw(w, h, bg, objs, rng)
    L = LANGS[lang]
    triples = [(o.shape, o.color, o.size, o.category) for o in objs]
    boxes = [o.box for o in objs]
    captions: list[str] = []
    for _ in range(200):
        omit = (False,) * len(OMITTABLE)
        if omit_prob > 0 and lang == "en":
            omit = tuple(bool(rng.random() < omit_prob) for _ in OMITTABLE)
        c = describe(triples, boxes, lang, rng, omit)
        if c not in captions:
            captions.append(c)
        if len(captions) == n_captions:
            break
    meta = {
        "lang": lang, "width": w, "height": h,
        "regions": [{"caption": L.region(t),
                     "box": [round(b[0] / w, 6), round(b[1] / h, 6), round(b[2] / w, 6), round(b[3] / h, 6)]}
                    for t, b in zip(triples, boxes)],
        "objects": [{"category": k, "shape": s, "color": c, "size": z, "class_id": CATEGORIES.index(k)}
                    for s, c, z, k in triples],
    }
    return {"image": img, "mask": mask, "captions": captions, "meta": meta}
