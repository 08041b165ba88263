"""The demo's world (format 4, issue 28): large glyphs drawn from fonts.

What a tiny ViT learns fast is layout *across* patches, not texture inside one
(``benchmarks/RESULTS.md``, demo probe): a glyph whose strokes are about a patch wide at the
training resolution (64 px, patch 8) is read from which patches its strokes cover. This module
draws such scenes: glyphs in distinct palette colours, each glyph's pixels labelled with its
class (a per-pixel *glyph class* mask, so a dense probe needs learned features), tight boxes
read off the mask. The demo draws ``LETTERS`` in ``DEMO_STYLE`` (:mod:`.sample`);
``benchmarks/demo_probe.py --world glyphs`` measures what the tiny tower learns of any style.

Options the probe compares (``draw_glyph_scene``): ``background`` (the demo's textured muted
ones, ``"black"``, or one ``"flat"`` muted colour), ``ink`` (the palette colour, ``"white"``, or
``"pastel"``: the palette colour mixed 60:40 with white), ``alphabet`` (the glyphs drawn, one
class each) and ``cells`` (blocky glyphs). What they showed (RESULTS.md, "Step 2"): the tiny
tower reads a glyph fast when its ink is bright on a dark ground (pastel or white on black:
0.97 top-1 at 15k samples for the letters AEHKMOSVXZ), and hardly at all in palette colours on
the textured backgrounds (0.18).

Fonts: matplotlib's bundled DejaVu family (Sans, Serif, Sans Mono; bold and book weights),
found through ``matplotlib.get_data_path()``; nothing is downloaded. Raises ``RuntimeError``
naming the folder when no font file is found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .world import _MIN_COLOR_DIST, _PALETTE, COLORS, SIZES, _background

GLYPHS: tuple[str, ...] = tuple("0123456789")
# The demo's categories: capitals whose coarse layouts differ at 64 px, patch 8 (the probe's
# AEHKMOSVXZ read at 0.97 supervised; "A" is swapped for "T" because a lower-cased "a" is
# also the article in every English caption). Drawn as in the probe's best row: pastel ink on
# black, the first 3 (bold) fonts, "medium" and "large" only (a "small" glyph's strokes are
# under half a patch at 64 px).
LETTERS: tuple[str, ...] = tuple("EHKMOSTVXZ")
LETTER_SIZES: tuple[str, ...] = ("medium", "large")
# The demo's glyph heights (fraction of the short side): larger than GLYPH_SIZE_FRAC's, so a
# "medium" glyph's strokes are still about 5 px at 64 px (the probe, supervised, 15k samples:
# 1-3 glyphs at GLYPH_SIZE_FRAC's medium and large 0.66, 1-2 large ones 0.84, with other
# letters and fonts between the two rows).
DEMO_SIZE_FRAC = {"medium": (0.56, 0.66), "large": (0.74, 0.86)}
DEMO_STYLE = dict(
    sizes=LETTER_SIZES, size_frac=DEMO_SIZE_FRAC, num_fonts=3, background="black", ink="pastel", alphabet=LETTERS
)
# Bold weights first: their strokes are the widest (about 0.15 of the glyph's height).
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSans.ttf",
)
# Glyph height as a fraction of the image's shorter side, per size word (gaps keep them apart).
GLYPH_SIZE_FRAC = {"small": (0.30, 0.38), "medium": (0.46, 0.56), "large": (0.66, 0.80)}
_MAX_ROT_DEG = 10.0


def font_dir() -> Path:
    """The folder of matplotlib's bundled TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=None)
def _font_paths() -> tuple[str, ...]:
    folder = font_dir()
    found = tuple(str(folder / f) for f in FONT_FILES if (folder / f).is_file())
    if not found:
        raise RuntimeError(f"no DejaVu font found in {folder} (matplotlib's bundled fonts)")
    return found


@lru_cache(maxsize=512)
def _font(font: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font, size)


@lru_cache(maxsize=4096)
def _glyph_bitmap(ch: str, font: str, height: int) -> np.ndarray:
    """Boolean (h, w) bitmap of `ch` whose ink is `height` px tall, cropped to its ink."""
    x0, y0, x1, y1 = _font(font, 100).getbbox(ch)
    size = max(4, round(100 * height / max(1, y1 - y0)))
    f = _font(font, size)
    x0, y0, x1, y1 = f.getbbox(ch)
    canvas = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4), 0)
    ImageDraw.Draw(canvas).text((2 - x0, 2 - y0), ch, fill=255, font=f)
    a = np.asarray(canvas) > 127
    ys, xs = np.nonzero(a)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def glyph_mask(ch: str, font: str, height: int, angle_deg: float, cells: int | None = None) -> np.ndarray:
    """Boolean bitmap of a glyph `height` px tall, rotated by `angle_deg` (expanded, cropped).
    Heights are rounded to 4 px and angles to 2 degrees, so that bitmaps are reused (a scene
    tries up to 40 placements per glyph; rendering each anew dominated the demo build).
    `cells`: draw the glyph `cells` px tall, then enlarge it (nearest) to `height`: a blocky
    glyph whose cells are `height / cells` px wide (no rotation)."""
    if cells:
        a = _glyph_bitmap(ch, font, cells)
        k = max(1, round(height / cells))
        return np.kron(a, np.ones((k, k), bool))
    return _rotated(ch, font, 4 * max(1, round(height / 4)), 2 * int(round(angle_deg / 2)))


@lru_cache(maxsize=16384)
def _rotated(ch: str, font: str, height: int, angle_deg: int) -> np.ndarray:
    a = _glyph_bitmap(ch, font, height)
    if angle_deg == 0:
        return a
    img = Image.fromarray(a.astype(np.uint8) * 255).rotate(angle_deg, resample=Image.BILINEAR, expand=True)
    r = np.asarray(img) > 127
    ys, xs = np.nonzero(r)
    return r[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


@dataclass
class Glyph:
    glyph: str
    color: str
    size: str
    font: str
    box: tuple[int, int, int, int]  # tight pixel edges x1 y1 x2 y2 (x2, y2 exclusive)


def draw_glyph_scene(
    rng: np.random.Generator,
    w: int,
    h: int,
    n: int,
    force_glyph: str | None = None,
    sizes: tuple[str, ...] = SIZES,
    num_fonts: int | None = None,
    centred: bool = False,
    cells: int | None = None,
    background: str = "demo",
    ink: str = "palette",
    alphabet: str | tuple[str, ...] = GLYPHS,
    size_frac: dict[str, tuple[float, float]] | None = None,
    colors: tuple[str, ...] | None = None,
) -> tuple[Image.Image, np.ndarray, list[Glyph]]:
    """A `w` x `h` scene of up to `n` glyphs (fewer when they do not fit), in distinct colours,
    each of one of `sizes` (`GLYPH_SIZE_FRAC`; crowded scenes fall back to the smallest of them),
    in one of the first `num_fonts` of `FONT_FILES` (all by default); `centred`: each glyph at
    the image's centre (+-2 px), for probing what placement costs (use with n=1).
    `cells`: blocky glyphs (see `glyph_mask`; no rotation); `background`: ``"demo"`` (textured,
    muted), ``"black"`` or ``"flat"`` (the demo background's mean colour); `ink`: ``"palette"``,
    ``"white"`` or ``"pastel"`` (palette colour mixed 60:40 with white; the colour name stays);
    `alphabet`: the glyphs to draw from (`GLYPHS` by default); `size_frac`: glyph height range
    per size word, as a fraction of the short side (`GLYPH_SIZE_FRAC` by default); `colors`:
    the palette colours a glyph may take (None: all; the draws are the same when it is None).

    Returns the RGB image, a uint8 mask (0 background, `alphabet.index(g) + 1` on each glyph's
    ink) and the glyphs with their tight boxes. Boxes stay >= 3 px apart."""
    bg, _ = _background(rng, w, h)
    if background == "black":
        bg = np.zeros_like(bg)
    elif background == "flat":  # one muted colour, the demo background's mean
        bg = np.broadcast_to(bg.reshape(-1, 3).mean(0), bg.shape).copy()
    img = bg.astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    placed: list[Glyph] = []
    short = min(w, h)
    for _ in range(n):
        for attempt in range(40):
            ch = force_glyph or alphabet[rng.integers(len(alphabet))]
            size = sizes[int(rng.integers(len(sizes)))] if attempt < 15 else sizes[0]
            height = max(10, int(rng.uniform(*(size_frac or GLYPH_SIZE_FRAC)[size]) * short))
            fonts = _font_paths()[:num_fonts] if num_fonts else _font_paths()
            font = fonts[rng.integers(len(fonts))]
            m = glyph_mask(ch, font, height, rng.uniform(-_MAX_ROT_DEG, _MAX_ROT_DEG), cells)
            gh, gw = m.shape
            if gw > w - 6 or gh > h - 6:
                continue
            if centred:
                x0, y0 = (w - gw) // 2 + int(rng.integers(-2, 3)), (h - gh) // 2 + int(rng.integers(-2, 3))
            else:
                x0, y0 = int(rng.integers(3, w - gw - 2)), int(rng.integers(3, h - gh - 2))
            box = (x0, y0, x0 + gw, y0 + gh)
            if any(
                box[0] < q.box[2] + 3 and q.box[0] < box[2] + 3 and box[1] < q.box[3] + 3 and q.box[1] < box[3] + 3
                for q in placed
            ):
                continue
            under = bg[y0 : y0 + gh, x0 : x0 + gw][m].reshape(-1, 3).mean(0)
            far = np.sqrt(((_PALETTE - under) ** 2).sum(1)) >= _MIN_COLOR_DIST
            ok = [
                c
                for c, f in zip(COLORS, far)
                if f and c not in {g.color for g in placed} and (colors is None or c in colors)
            ]
            if not ok:
                continue
            color = ok[rng.integers(len(ok))]
            fill = np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255).astype(np.float32)
            if ink == "white":
                fill[:] = 255.0
            elif ink == "pastel":  # the colour mixed 60:40 with white: bright on any dark background
                fill = 255.0 - 0.4 * (255.0 - fill)
            region = img[y0 : y0 + gh, x0 : x0 + gw]
            region[m] = fill
            mask[y0 : y0 + gh, x0 : x0 + gw][m] = alphabet.index(ch) + 1
            ys, xs = np.nonzero(m)
            placed.append(
                Glyph(
                    ch,
                    color,
                    size,
                    Path(font).stem,
                    (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1),
                )
            )
            break
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)), mask, placed


def glyph_scene_size(rng: np.random.Generator, max_aspect: float = 2.0, short=(64, 160)) -> tuple[int, int]:
    """(w, h): short side uniform in `short`, aspect log-uniform in [1/max_aspect, max_aspect]."""
    s = int(rng.integers(short[0], short[1] + 1))
    ar = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
    return (int(round(s * ar)), s) if ar >= 1 else (s, int(round(s / ar)))


# Elongated images (issue 28): a "word" of 4 letters read along the long side. Five anagram
# pairs, so that telling a word from its pair needs the letters' order, not only which letters
# are there. Every word is drawn from LETTERS.
WORDS: tuple[str, ...] = ("MOST", "TOMS", "HOSE", "SHOE", "MESH", "HEMS", "VOTE", "VETO", "STEM", "METS")
WORD_LAYOUTS: tuple[str, ...] = ("row", "column", "grid")
# Letter height as a fraction of `short`, every layout's cell side across the word (a row's
# height, a column's width, a grid cell's side), before it is lowered to fit the cells.
WORD_GLYPH_FRAC = (0.55, 0.72)
_WORD_MAX_ROT_DEG = 5.0


def draw_word(
    rng: np.random.Generator,
    word: str,
    layout: str,
    short: int,
    aspect: float,
    color: str,
    font: str,
    ink: str = "pastel",
) -> tuple[Image.Image, np.ndarray, list[Glyph]]:
    """A `word`'s letters in one colour on black, one letter per cell, read in cell order.

    `layout`: ``"row"`` (a `short` px tall, `aspect` x `short` wide strip, read left to
    right), ``"column"`` (the same strip stood up, read top to bottom) or ``"grid"`` (a square
    of side 2 x `short`, 2 x 2 cells read row by row: the same letters, pixel for pixel, as a
    row or column of the same draw, undistorted by a square model's resize). `aspect` (row and
    column) >= 2: each of the 4 cells is `aspect / 4` x `short` long. The letters share one
    height (55-72% of `short`), lowered until each fits 90% of its cell in every layout at this
    `aspect` (pass the same `aspect` for a grid to get the letters of that draw's row and
    column). `color`: a palette name (``world.COLORS``); `font`: a path from
    ``_font_paths()``; `ink`: ``"pastel"`` (palette colour mixed 60:40 with white) or
    ``"palette"``.

    Returns the RGB image, a uint8 mask (0 background, ``LETTERS.index(c) + 1`` on each letter's
    ink) and one `Glyph` per letter with its tight box (size ``"word"``). Raises ``ValueError``
    for a letter outside ``LETTERS``, an unknown layout or an aspect under 2.
    """
    if layout not in WORD_LAYOUTS:
        raise ValueError(f"layout must be one of {WORD_LAYOUTS}, got {layout!r}")
    bad = [c for c in word if c not in LETTERS]
    if bad:
        raise ValueError(f"word {word!r} has letters outside {''.join(LETTERS)}: {bad}")
    if layout != "grid" and aspect < 2.0:
        raise ValueError(f"a {layout} word needs aspect >= 2, got {aspect}")
    k = len(word)
    if layout == "grid":
        side = 2 * short
        w = h = side
        cols = 2
        cells = [((i % cols) * short, (i // cols) * short, short, short) for i in range(k)]
    else:
        long = int(round(aspect * short))
        step = long / k
        if layout == "row":
            w, h = long, short
            cells = [
                (int(round(i * step)), 0, int(round((i + 1) * step)) - int(round(i * step)), short) for i in range(k)
            ]
        else:
            w, h = short, long
            cells = [
                (0, int(round(i * step)), short, int(round((i + 1) * step)) - int(round(i * step))) for i in range(k)
            ]
    img = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), np.uint8)
    fill = np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255).astype(np.float32)
    if ink == "pastel":
        fill = 255.0 - 0.4 * (255.0 - fill)
    placed: list[Glyph] = []
    # One letter height for the whole word, a share of `short` (every layout's cell side across
    # the word), made smaller until every letter fits 90% of its cell in *every* layout at this
    # aspect (a row's narrow cell, a column's short one, a grid's square), so that the same draw
    # gives the same letters, pixel for pixel, whatever the layout.
    height = max(8, int(rng.uniform(*WORD_GLYPH_FRAC) * short))
    angles = [rng.uniform(-_WORD_MAX_ROT_DEG, _WORD_MAX_ROT_DEG) for _ in word]
    limits = {(c[2], c[3]) for c in cells}
    if aspect >= 2.0:
        step = int(aspect * short / k)  # the narrowest of a row's (or column's) rounded cells
        limits |= {(step, short), (short, step), (short, short)}

    def fits(hgt: int) -> bool:
        return all(
            m.shape[1] <= 0.9 * cw and m.shape[0] <= 0.9 * ch_
            for m in (glyph_mask(c, font, hgt, a) for c, a in zip(word, angles))
            for cw, ch_ in limits
        )

    while height > 8 and not fits(height):
        height = max(8, int(height * 0.9))
    for ch, angle, (cx, cy, cw, ch_) in zip(word, angles, cells):
        m = glyph_mask(ch, font, height, angle)
        gh, gw = m.shape
        # jitter, up to a sixth of the slack each way; drawn as floats, so that every layout
        # makes the same draws (an integer draw from a range of one value makes none)
        ux, uy = rng.random(2) * 2 - 1
        x0 = cx + (cw - gw) // 2 + int(round(ux * ((cw - gw) // 6)))
        y0 = cy + (ch_ - gh) // 2 + int(round(uy * ((ch_ - gh) // 6)))
        img[y0 : y0 + gh, x0 : x0 + gw][m] = fill
        mask[y0 : y0 + gh, x0 : x0 + gw][m] = LETTERS.index(ch) + 1
        ys, xs = np.nonzero(m)
        placed.append(
            Glyph(
                ch,
                color,
                "word",
                Path(font).stem,
                (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1),
            )
        )
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)), mask, placed
