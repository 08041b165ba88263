"""The embedded demo data: procedurally drawn glyphs with captions, boxes and masks.

Why it exists: every part of the recipe needs data that carries its signal, and the real
data (WebLI) is neither shippable nor small. A scene of 1 or 2 large letters on black (train:
60% one; refexp: always two) gives the
sigmoid loss something learnable (letter, colour, size, layout), LocCa its three targets
(caption, region caption -> box, box -> region caption), the dense probe a per-pixel
*glyph-class* mask, NaFlex aspect ratios from 1:2 to 2:1, and the tokenizer a 90/10 English /
multilingual mix with non-Latin scripts, all from a seed, in about a minute.

An object's *category* is its letter (``CATEGORIES``: EHKMOSTVXZ), drawn from matplotlib's
bundled DejaVu bold fonts in pastel ink (its colour mixed 60:40 with white) on black, at most
+-10 degrees off upright. Why glyphs (format version 4, issue 28): a tiny ViT at 64 px,
patch 8, learns layout *across* patches fast (a glyph whose strokes are about a patch wide)
and texture inside a patch hardly at all; the category used to be a fill pattern that it
could only read through an accent colour. ``benchmarks/demo_probe.py --world glyphs``
measured the cue (``benchmarks/RESULTS.md``, "Step 2"): 0.97 supervised top-1 at 15k samples
for one large glyph of AEHKMOSVXZ per square image, 0.84 for 1-2 large glyphs at aspect up
to 2:1 (the shipped EHKMOSTVXZ at format 4's sizes was not probed). English train captions
leave out the size and the colour half the time each (never the letter), as alt-text does,
so prompts naming the letter alone ("a photo of a letter K.") are in distribution.
Pastel "red" reads as pink and "orange" as peach; the colour words stay the palette's names.

Words on elongated images (format 5, issue 28): with ``word_share`` > 0 (``data.demo.word_share``,
default 0: the default job did not read them, docs/results.md) that share of train images is
a *word* of 4 letters (``WORDS``: five anagram pairs such as MOST / TOMS, so the order must be read) in one
colour, one letter per cell, laid out as a row (aspect 2:1 to 4:1, read left to right), a
column (1:2 to 1:4, top to bottom) or a 2 x 2 square grid. A square resize squashes a row's
letters to a quarter of their width; NaFlex keeps them. The letters are the same, pixel for
pixel, in every layout of one draw. Captions name the word and its
colour ("a photo of a red word MOST"), region captions each letter ("red letter M").
Two eval sets ask the word zero-shot ("a photo of a word {c}."): ``words`` (rows and
columns) and ``words_square`` (the same draws, sample by sample, laid out 2 x 2), so that
what the square resize costs a fixed-resolution model is the difference between the two.

Layout (img2dataset keys: ``jpg`` image, ``txt`` caption, ``json`` metadata, ``seg.png``
class mask; ``0`` background, ``class_id + 1`` on each glyph's ink, class = letter)::

    root/train/{000000..0000NN}.tar
    root/eval/{zeroshot,retrieval,refexp,segmentation,words,words_square}/{000000..000003}.tar + <name>.yaml
    root/tokenizer/demo_sp.model
    root/DONE.json        written last; holds the generation parameters and file sizes

``regions[i]`` and ``objects[i]`` describe the same drawn glyph (a word image's letters;
``meta["word"]`` holds the word, its layout, colour, region caption and box); boxes are normalised pixel
edges ``[x1/W, y1/H, (x2+1)/W, (y2+1)/H]`` of the glyph's tight ink bounding box.

Entry points: :func:`ensure_demo` (build once, atomically, under a file lock; reuse after)
and ``python -m siglip2.data.demo --out DIR``. :func:`render_grid` draws samples with their
boxes for a person to look at.

Modules, one job each: :mod:`.glyphs` (letters, fonts, drawing a scene's image, mask and
boxes), :mod:`.world` (the palette, sizes and backgrounds, and the earlier pattern world the
probes still compare), :mod:`.languages` (captions and region captions in 9 languages,
zero-shot prompts), :mod:`.sample` (one sample: scene + captions + metadata), :mod:`.splits`
(the splits, writing a shard, the eval YAMLs), :mod:`.corpus` (the tokenizer's training
text), :mod:`.build` (build once into a folder, reuse after), :mod:`.view`
(:func:`render_grid`), :mod:`.cli` (``python -m``). This package re-exports the public API.
"""

from .build import FORMAT_VERSION, DemoData, ensure_demo
from .cli import main  # noqa: F401  (was siglip2.data.demo.main)
from .glyphs import LETTER_SIZES as SIZES
from .glyphs import LETTERS as CATEGORIES
from .glyphs import WORDS
from .languages import LANGS, WORD_TEMPLATES, ZEROSHOT_TEMPLATES, describe, word_forms
from .sample import generate_sample, generate_word_sample
from .splits import _SPLITS  # noqa: F401  (tests read the train split's omit_prob)
from .view import render_grid
from .world import COLORS


__all__ = [
    "CATEGORIES",
    "COLORS",
    "SIZES",
    "LANGS",
    "WORDS",
    "WORD_TEMPLATES",
    "ZEROSHOT_TEMPLATES",
    "FORMAT_VERSION",
    "DemoData",
    "ensure_demo",
    "generate_sample",
    "generate_word_sample",
    "render_grid",
    "word_forms",
    "describe",
]
