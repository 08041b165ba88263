"""The embedded demo data: procedurally drawn objects with captions, boxes and masks.

Why it exists: every part of the recipe needs data that carries its signal, and the real
data (WebLI) is neither shippable nor small. A scene of 1-4 objects on a textured
background gives the sigmoid loss something learnable (category, colour, shape, size,
layout), LocCa its three targets (caption, region caption -> box, box -> region caption),
the dense probe a per-pixel class mask, NaFlex aspect ratios from 1:2 to 2:1, and the
tokenizer a 90/10 English / multilingual mix with non-Latin scripts, all from a seed, in
about a minute.

An object's *category* is its look: a fill pattern (striped, dotted, checkered, ...:
``CATEGORIES``) at a random period and angle, in the object's colour and the category's own
accent hue (``ACCENTS``; ``plain`` is one tone). The accent is what the tiny ViT learns: it
sees colour within a few thousand samples, but neither a silhouette (the shape) nor a
pattern in two tones of one colour within the demo's budget (``benchmarks/demo_probe.py``
measured each: see ``benchmarks/RESULTS.md``). Shape stays in the data and has its own
zero-shot set. English train captions leave out the size, colour, category or shape noun now
and then, as alt-text does, so prompts naming one attribute ("a photo of a striped shape.", "a photo of a star.")
are not out of distribution.

Layout (img2dataset keys: ``jpg`` image, ``txt`` caption, ``json`` metadata, ``seg.png``
class mask; ``0`` background, ``class_id + 1`` on each object, class = category)::

    root/train/{000000..0000NN}.tar
    root/eval/{zeroshot,zeroshot_shape,retrieval,refexp,segmentation}/{000000..000003}.tar + <name>.yaml
    root/tokenizer/demo_sp.model
    root/DONE.json        written last; holds the generation parameters and file sizes

``regions[i]`` and ``objects[i]`` describe the same drawn object; boxes are normalised pixel
edges ``[x1/W, y1/H, (x2+1)/W, (y2+1)/H]`` of the shape's tight mask bounding box.

Entry points: :func:`ensure_demo` (build once, atomically, under a file lock; reuse after)
and ``python -m siglip2.data.demo --out DIR``. :func:`render_grid` draws samples with their
boxes for a person to look at.

Modules, one job each: :mod:`.world` (categories, shapes, colours, sizes, accents; drawing a
scene's image, mask and boxes), :mod:`.languages` (captions and region captions in 9
languages, zero-shot prompts), :mod:`.sample` (one sample: scene + captions + metadata),
:mod:`.splits` (the splits, writing a shard, the eval YAMLs), :mod:`.corpus` (the tokenizer's
training text), :mod:`.build` (build once into a folder, reuse after), :mod:`.view`
(:func:`render_grid`), :mod:`.cli` (``python -m``). This package re-exports the public API.
"""

from .build import FORMAT_VERSION, DemoData, ensure_demo
from .cli import main  # noqa: F401  (was siglip2.data.demo.main)
from .languages import LANGS, SHAPE_TEMPLATES, ZEROSHOT_TEMPLATES, describe, word_forms
from .sample import generate_sample
from .splits import _SPLITS  # noqa: F401  (tests read the train split's omit_prob)
from .view import render_grid
from .world import ACCENTS, CATEGORIES, COLORS, SHAPES, SIZES


__all__ = [
    "CATEGORIES", "ACCENTS", "SHAPES", "COLORS", "SIZES", "LANGS", "ZEROSHOT_TEMPLATES", "SHAPE_TEMPLATES",
    "FORMAT_VERSION",
    "DemoData", "ensure_demo", "generate_sample", "render_grid", "word_forms", "describe",
]
