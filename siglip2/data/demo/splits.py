"""The demo's splits and their shards: what each split holds, and writing one shard.

Train plus six eval sets (zeroshot by letter, retrieval, refexp, segmentation by glyph class,
and zero-shot by word on elongated images, ``words``, and on the same words laid out square,
``words_square``), each from its own seed stream (the two word sets share one), cut into ~1000-sample img2dataset-style tar
shards (``jpg``, ``txt``, ``json``, ``seg.png``) with fixed tar times and JPEG settings, so the
same seed gives the same bytes whatever the worker count; and the eval-set YAMLs that point
the eval harness at them.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
from PIL import Image

from .glyphs import LETTERS, WORD_LAYOUTS, WORDS
from .languages import WORD_TEMPLATES, ZEROSHOT_TEMPLATES
from .sample import generate_sample, generate_word_sample
from .world import COLORS

# sid: the split's seed stream, so eval sets never share random draws with train.
_SPLITS = {
    # Most train images hold one glyph: in benchmarks/glyph_contrastive.py's own-data world
    # (English captions, AEHKMOSVXZ) the default budget read the letter zero-shot at 0.68 from
    # one large glyph per square image and 0.26 from 1-3 glyphs. English train captions leave
    # size and colour out half the time each (there: 0.68 with omission vs 0.38 without), so
    # prompts naming the letter alone are in distribution and the letter, not the colour, must
    # tell captions apart. On this demo the default job reaches 0.31-0.41 (docs/results.md).
    # ensure_demo's word_share of train images (default 0) is a word (issue 28's elongated
    # images), in one of WORD_LAYOUTS at random (row 2:1-4:1, column 1:2-1:4, or the 2 x 2
    # square grid); with 0 the train split is drawn exactly as without words.
    "train": dict(sid=0, n_objects=(1, 2), p=(0.6, 0.4), omit_prob=0.5),
    # single glyphs, balanced over the letters
    "zeroshot": dict(sid=1, n_objects=(1,), p=(1.0,), label="category"),
    "retrieval": dict(sid=2, n_objects=(1, 2), p=(0.5, 0.5), n_captions=3),
    "refexp": dict(sid=3, n_objects=(2,), p=(1.0,)),
    "segmentation": dict(sid=4, n_objects=(1, 2), p=(0.5, 0.5)),
    # the words, balanced: elongated (row or column), and the same draws laid out square
    # (one seed stream: sample i of both sets is the same word, colour, font and size)
    "words": dict(sid=5, layouts=("row", "column"), label="word"),
    "words_square": dict(sid=5, layouts=("grid",), label="word"),
    # Fairness sets (issue 30), single glyphs balanced over the letters: none in an attribute
    # colour (representation bias: does the model prefer "red" or "blue" for them?), and each
    # in one attribute colour, alternating (association bias: does the colour move the letter
    # the model reads?). BIAS_ATTRIBUTES stand in for a sensitive attribute such as perceived
    # gender; ensure_demo's bias_strength / bias_share plant a bias on them in train.
    "bias_neutral": dict(sid=6, n_objects=(1,), p=(1.0,), label="category", colors="neutral"),
    "bias_attributed": dict(sid=7, n_objects=(1,), p=(1.0,), label="category", colors="attribute"),
}
_EVAL_SPLITS = (
    "zeroshot",
    "retrieval",
    "refexp",
    "segmentation",
    "words",
    "words_square",
    "bias_neutral",
    "bias_attributed",
)
BIAS_ATTRIBUTES = ("red", "blue")
# The planted bias's halves of the alphabet: with bias_strength s (and bias_share 1/2) the first
# half is drawn red (1 + s) / (1 - s) times as often as blue, the second half the other way round.
BIAS_GROUPS = (LETTERS[: len(LETTERS) // 2], LETTERS[len(LETTERS) // 2 :])


def bias_accept(glyphs: list[dict], strength: float, share: float) -> float:
    """The chance to keep a train scene under the planted bias (rejection sampling): per glyph
    in an attribute colour, w(colour, letter) / max w with w(red, first half) = share (1 + s),
    w(blue, first half) = (1 - share)(1 - s), w(red, second half) = share (1 - s),
    w(blue, second half) = (1 - share)(1 + s); 1 for other colours. Among one-glyph scenes red
    is then `share` of the attribute glyphs (first order; scenes with a red and a blue glyph pull
    it a little towards 1/2) and red : blue is share / (1 - share) x (1 + s) / (1 - s) in the
    first half, share / (1 - share) x (1 - s) / (1 + s) in the second (second order: 21 and 0.26
    at s = 0.8, share = 0.7; 9 and 1/9 at share = 0.5)."""
    top = max(share, 1 - share) * (1 + strength)
    p = 1.0
    for g in glyphs:
        if g["color"] not in BIAS_ATTRIBUTES:
            continue
        red = g["color"] == BIAS_ATTRIBUTES[0]
        first = g["category"] in BIAS_GROUPS[0]
        w = (share if red else 1 - share) * (1 + strength if red == first else 1 - strength)
        p *= w / top
    return p


_LABELS = {"category": LETTERS, "word": WORDS}
_PER_SHARD = 1000
_MIN_SHARDS = 4  # so 2 ranks x 2 loader workers each get a shard of a small split
_JPEG_QUALITY = 90
_TAR_MTIME = 0  # fixed tar header time: same seed, same bytes


def _shard_plan(n: int) -> list[tuple[int, int]]:
    """(start, count) per shard: ~1000 per shard, at least 4 shards when there are 4 samples."""
    k = max(math.ceil(n / _PER_SHARD), min(_MIN_SHARDS, n), 1)
    base, extra = divmod(n, k)
    plan, start = [], 0
    for i in range(k):
        c = base + (i < extra)
        plan.append((start, c))
        start += c
    return plan


def _encode(sample: dict) -> dict:
    buf = io.BytesIO()
    # 4:4:4: chroma subsampling would bleed a glyph's colour into the black around its strokes
    sample["image"].save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    mbuf = io.BytesIO()
    Image.fromarray(sample["mask"]).save(mbuf, format="PNG")
    return {
        "jpg": buf.getvalue(),
        "txt": sample["captions"][0].encode("utf-8"),
        "json": json.dumps(sample["meta"], ensure_ascii=False).encode("utf-8"),
        "seg.png": mbuf.getvalue(),
    }


def _write_shard(task: tuple) -> tuple[str, int, list[str]]:
    """Write one shard from its own seed stream (seed, split, shard): worker count is irrelevant.

    Returns the texts the tokenizer is trained on (train split only).
    """
    from webdataset import TarWriter

    path, split, seed, shard, start, count, word_share, bias = task
    cfg = _SPLITS[split]
    strength, share = bias
    planted = split == "train" and (strength > 0 or share != 0.5)  # else no draw: the default's bytes
    rng = np.random.default_rng([seed, cfg["sid"], shard])
    texts: list[str] = []
    with TarWriter(path, mtime=_TAR_MTIME) as tw:
        for i in range(start, start + count):
            force = {}
            if "label" in cfg:  # balanced classes
                names = _LABELS[cfg["label"]]
                force = {cfg["label"]: names[i % len(names)]}
            if "layouts" in cfg:  # a word set: the layout draw is made in every layout set alike
                layout = cfg["layouts"][int(rng.random() * len(cfg["layouts"]))]
                s = generate_word_sample(rng, layout, force=force)
            elif split == "train" and word_share > 0 and rng.random() < word_share:  # 0: no draw
                s = generate_word_sample(
                    rng, WORD_LAYOUTS[int(rng.integers(len(WORD_LAYOUTS)))], omit_prob=cfg.get("omit_prob", 0.0)
                )
            elif "colors" in cfg:  # a fairness set
                # red for the first 10 samples (one of each letter), blue for the next 10, ...: every
                # (letter, colour) pair equally often (i % 2 would tie each letter to one colour)
                colors = (
                    (BIAS_ATTRIBUTES[(i // len(LETTERS)) % 2],)
                    if cfg["colors"] == "attribute"
                    else tuple(c for c in COLORS if c not in BIAS_ATTRIBUTES)
                )
                s = generate_sample(rng, 1, force=force, colors=colors)
                s["meta"]["attribute"] = colors[0] if cfg["colors"] == "attribute" else None
            else:
                n = int(rng.choice(cfg["n_objects"], p=cfg["p"]))
                s = generate_sample(
                    rng, n, force=force, n_captions=cfg.get("n_captions", 1), omit_prob=cfg.get("omit_prob", 0.0)
                )
                # the planted bias (0: no draw): scenes against it are drawn again
                while planted and rng.random() >= bias_accept(s["meta"]["objects"], strength, share):
                    s = generate_sample(
                        rng, n, force=force, n_captions=cfg.get("n_captions", 1), omit_prob=cfg.get("omit_prob", 0.0)
                    )
            if "label" in cfg:
                s["meta"]["label"] = _LABELS[cfg["label"]].index(force[cfg["label"]])
            if split == "retrieval":
                s["meta"]["captions"] = s["captions"]
            tw.write({"__key__": f"{i:09d}", **_encode(s)})
            if split == "train":
                texts.extend(s["captions"])
                texts.extend(r["caption"] for r in s["meta"]["regions"])
    return split, shard, texts


def _brace(n: int) -> str:
    return f"{{000000..{n - 1:06d}}}.tar"


def _yaml_specs(counts: dict[str, int]) -> dict[str, dict]:
    n = {s: len(_shard_plan(counts[s])) for s in _EVAL_SPLITS}
    return {
        "zeroshot": {
            "name": "demo_zeroshot",
            "task": "zeroshot",
            "urls": _brace(n["zeroshot"]),
            "num_samples": counts["zeroshot"],
            "classnames": list(LETTERS),
            "templates": list(ZEROSHOT_TEMPLATES),
            "label_key": "label",
            "lang_key": "lang",
        },
        "retrieval": {
            "name": "demo_retrieval",
            "task": "retrieval",
            "urls": _brace(n["retrieval"]),
            "num_samples": counts["retrieval"],
            "captions_key": "captions",
            "lang_key": "lang",
        },
        "refexp": {
            "name": "demo_refexp",
            "task": "refexp",
            "urls": _brace(n["refexp"]),
            "num_samples": counts["refexp"],
            "regions_key": "regions",
            "lang_key": "lang",
        },
        "segmentation": {
            "name": "demo_segmentation",
            "task": "segmentation",
            "urls": _brace(n["segmentation"]),
            "num_samples": counts["segmentation"],
            "classnames": list(LETTERS),
            "mask_key": "seg.png",
            "background_id": 0,
            "num_classes": len(LETTERS) + 1,
            "lang_key": "lang",
        },
        **{
            s: {
                "name": f"demo_{s}",
                "task": "zeroshot",
                "urls": _brace(n[s]),
                "num_samples": counts[s],
                "classnames": list(WORDS),
                "templates": list(WORD_TEMPLATES),
                "label_key": "label",
                "lang_key": "lang",
            }
            for s in ("words", "words_square")
        },
        "bias_neutral": {
            "name": "demo_bias_neutral",
            "task": "representation_bias",
            "urls": _brace(n["bias_neutral"]),
            "num_samples": counts["bias_neutral"],
            "classnames": list(BIAS_ATTRIBUTES),
            "templates": ["a photo of a {c} letter."],
        },
        "bias_attributed": {
            "name": "demo_bias_attributed",
            "task": "association_bias",
            "urls": _brace(n["bias_attributed"]),
            "num_samples": counts["bias_attributed"],
            "classnames": list(LETTERS),
            "templates": list(ZEROSHOT_TEMPLATES),
            "attributes": list(BIAS_ATTRIBUTES),
            "attribute_key": "attribute",
            "label_key": "label",
        },
        # the few-shot linear probe on the zero-shot set's images (big_vision's fewshot evaluator)
        "fewshot": {
            "name": "demo_fewshot",
            "task": "fewshot",
            "urls": "../zeroshot/" + _brace(n["zeroshot"]),
            "num_samples": counts["zeroshot"],
            "classnames": list(LETTERS),
            "label_key": "label",
        },
    }
