"""The demo's world: what can be drawn, and drawing one scene's image, class mask and boxes.

Categories (fill patterns with their accent hues), shapes, colours and sizes; each shape as a
unit polygon; a muted background, rejection-sampled object placement, the fill patterns, and
the rasteriser that makes the image and the class mask from the same silhouettes and reads
tight boxes off the mask. No words here: captions are :mod:`.languages`, a whole sample
(scene + captions + metadata) is :mod:`.sample`. Why the categories are accents and patterns:
``benchmarks/demo_probe.py``, ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The category of an object is how it is filled: a pattern in its colour and the category's
# accent hue (ACCENTS below).
CATEGORIES: tuple[str, ...] = ("striped", "dotted", "checkered", "wavy", "ringed", "speckled", "plain", "gradient")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart")
# Saturated or extreme colours: backgrounds are muted mid-tones, so every object stands out.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "green": (35, 165, 60), "blue": (30, 70, 215), "yellow": (245, 215, 25),
    "purple": (135, 50, 175), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object extent (longest side before rotation) as a fraction of the image's shorter side.
# The gaps between the ranges keep "small" / "medium" / "large" unambiguous to a model.
_SIZE_FRAC = {"small": (0.22, 0.28), "medium": (0.34, 0.41), "large": (0.48, 0.56)}
_MIN_EXTENT = 12  # px; below this a star is a blob
_MAX_ROT_DEG = 12.0  # small, so a rotated square never passes for a diamond
_MIN_COLOR_DIST = 100.0  # RGB distance between an object's colour and the background under it
_SHORT_SIDE = (64, 160)
_MAX_ASPECT = 2.0

# Pattern period as a fraction of the image's longer side (so the squashed 64 px training view
# keeps >= ~4 px per period).
_PERIOD_FRAC = (0.065, 0.10)
_MIN_PERIOD = 6.0  # px in the drawn image
# Each category's signature second tone (``plain`` has none). These hues are used for nothing
# else (no object colour, no background: those are muted), so seeing one in an object is
# seeing its category: a cue a tiny ViT learns as fast as colour. A pattern alone, in two
# tones of the object's colour, was not learned in the demo's budget (benchmarks/RESULTS.md).
ACCENTS: dict[str, tuple[int, int, int] | None] = {
    "striped": (255, 140, 200), "dotted": (0, 225, 235), "checkered": (180, 255, 0), "wavy": (110, 55, 15),
    "ringed": (0, 0, 110), "speckled": (255, 0, 255), "plain": None, "gradient": (130, 200, 255),
}
_MIN_ACCENT_DIST = 100.0  # an object's colour and its accent stay this far apart (RGB)


def _unit_polygons() -> dict[str, np.ndarray]:
    """Each shape as a polygon centred at 0 with half-extent 1 (y down), drawn by PIL later.

    One polygon per shape (circles included) so that rotation, the image and the mask all go
    through the same rasteriser and stay pixel-identical.
    """
    def ring(n, r=1.0, start=0.0):
        a = start + np.arange(n) * 2 * np.pi / n
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)

    star = np.empty((10, 2))
    star[0::2] = ring(5, 1.0, -np.pi / 2)
    star[1::2] = ring(5, 0.45, -np.pi / 2 + np.pi / 5)
    w = 0.33
    cross = np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                      (-w, w), (-1, w), (-1, -w), (-w, -w)], float)
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    polys = {
        "circle": ring(64),
        "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float),
        "triangle": np.array([(0, -1), (1, 0.732), (-1, 0.732)], float),
        "star": star,
        "hexagon": ring(6),
        "cross": cross,
        "diamond": np.array([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)], float),
        "heart": heart,
    }
    out = {}
    for k, p in polys.items():  # centre the bounding box, scale the longest half-side to 1
        lo, hi = p.min(0), p.max(0)
        out[k] = (p - (lo + hi) / 2) / ((hi - lo).max() / 2)
    return out


_POLYS = _unit_polygons()


def _muted(rng) -> np.ndarray:
    """A background colour of low saturation and middle value: every palette colour contrasts."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.38, 0.72)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


# Pixel noise is cut from one fixed bank: drawing fresh normals per image was a third of the time.
_NOISE = np.random.default_rng(20250221).standard_normal((384, 384, 1), dtype=np.float32) * np.float32(4.0)


def _background(rng, w: int, h: int) -> tuple[np.ndarray, str]:
    """Solid, gradient, blotchy texture or faint stripes, plus light pixel noise."""
    kind = ("solid", "gradient", "texture", "stripes")[rng.integers(4)]
    if kind == "solid":
        img = np.broadcast_to(_muted(rng).astype(np.float32), (h, w, 3))
    elif kind == "gradient":
        c1, c2 = _muted(rng).astype(np.float32), _muted(rng).astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        t = (np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(a))
             + np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(a)))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1 + (c2 - c1) * t[..., None]
    elif kind == "texture":
        gh, gw = rng.integers(3, 9, size=2)
        grid = np.clip(_muted(rng) + rng.normal(0, 22, size=(gh, gw, 3)), 0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    else:
        c1 = _muted(rng).astype(np.float32)
        c2 = np.clip(c1 + rng.normal(0, 18, 3), 0, 255).astype(np.float32)
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        t = (np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(a))
             + np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(a)))
        on = (np.sin(t * np.float32(2 * np.pi / period)) > 0)[..., None]
        img = np.where(on, c1, c2)
    oy, ox = rng.integers(0, _NOISE.shape[0] - h + 1), rng.integers(0, _NOISE.shape[1] - w + 1)
    img = img + _NOISE[oy:oy + h, ox:ox + w]
    return np.clip(img, 0, 255, out=img).astype(np.uint8), kind


def _image_size(rng) -> tuple[int, int]:
    """Short side 64..160 px, aspect log-uniform in [1:2, 2:1] (NaFlex needs the spread)."""
    s = int(rng.integers(_SHORT_SIDE[0], _SHORT_SIDE[1] + 1))
    ar = math.exp(rng.uniform(-math.log(_MAX_ASPECT), math.log(_MAX_ASPECT)))
    return (int(round(s * ar)), s) if ar >= 1 else (s, int(round(s / ar)))


@dataclass
class _Obj:
    shape: str
    color: str
    size: str
    category: str
    poly: np.ndarray  # (P, 2) pixel coordinates
    fill: tuple[int, int, int]
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # tight mask box, pixel edges x1 y1 x2 y2


_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)


def _place(rng, w, h, n, force: dict[str, str], bg) -> list[_Obj]:
    """Rejection-sample n objects whose boxes stay 3 px apart, shrinking ones that do not fit.

    ``force`` fixes attributes of every object (``{"category": "dotted"}``: a balanced eval set)."""
    short = min(w, h)
    placed: list[_Obj] = []
    rects: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for attempt in range(40):
            shape = force.get("shape") or SHAPES[rng.integers(len(SHAPES))]
            category = force.get("category") or CATEGORIES[rng.integers(len(CATEGORIES))]
            size_i = int(rng.integers(3))
            if attempt >= 15:  # crowded image: fall back to smaller sizes before giving up
                size_i = min(size_i, 1 if attempt < 28 else 0)
            size = SIZES[size_i]
            extent = max(_MIN_EXTENT, rng.uniform(*_SIZE_FRAC[size]) * short)
            ang = math.radians(rng.uniform(-_MAX_ROT_DEG, _MAX_ROT_DEG))
            rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
            p = _POLYS[shape] @ rot.T * (extent / 2)
            lo, hi = p.min(0), p.max(0)
            if hi[0] - lo[0] > w - 6 or hi[1] - lo[1] > h - 6:
                continue
            cx = rng.uniform(2 - lo[0], w - 3 - hi[0])
            cy = rng.uniform(2 - lo[1], h - 3 - hi[1])
            r = (cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1])
            if any(r[0] < q[2] + 3 and q[0] < r[2] + 3 and r[1] < q[3] + 3 and q[1] < r[3] + 3 for q in rects):
                continue
            # colour: contrasting with the background under the object, and the description
            # unique in the image so that every region caption refers to exactly one object
            x0, y0 = int(max(r[0], 0)), int(max(r[1], 0))
            under = bg[y0:int(r[3]) + 1, x0:int(r[2]) + 1].reshape(-1, 3).mean(0)
            taken = {(o.shape, o.color, o.size, o.category) for o in placed}
            far = np.sqrt(((_PALETTE - under) ** 2).sum(1)) >= _MIN_COLOR_DIST
            accent = ACCENTS[category]
            ok = [c for c, f in zip(COLORS, far) if f and (shape, c, size, category) not in taken
                  and (accent is None or np.linalg.norm(np.subtract(COLORS[c], accent)) >= _MIN_ACCENT_DIST)]
            if not ok:
                continue
            color = ok[rng.integers(len(ok))]
            fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255))
            placed.append(_Obj(shape, color, size, category, p + (cx, cy), fill))
            rects.append(r)
            break
    return placed


def _pattern(category: str, x: np.ndarray, y: np.ndarray, period: float, rng) -> np.ndarray:
    """How much of the second tone each pixel takes, in [0, 1], for a fill pattern.

    ``x``, ``y``: pixel centres relative to the object's centre (px); ``period``: the pattern's
    repeat (px). Every pattern but ``plain`` puts about half its area in each tone."""
    a = rng.uniform(0, np.pi)
    u = x * np.cos(a) + y * np.sin(a)
    v = -x * np.sin(a) + y * np.cos(a)
    u0, v0 = rng.uniform(0, period, 2)  # phase
    if category == "striped":
        return ((u + u0) / period) % 1.0 < 0.5
    if category == "checkered":
        side = 0.6 * period
        return (np.floor((u + u0) / side) + np.floor((v + v0) / side)) % 2 == 1
    if category == "dotted":  # discs on a square lattice, 40% of the area
        du = (u + u0) % period - period / 2
        dv = (v + v0) % period - period / 2
        return du * du + dv * dv < 0.4 * period * period / np.pi
    if category == "wavy":  # stripes bent by a sine across them
        bend = 0.3 * period * np.sin(2 * np.pi * (v + v0) / (1.6 * period))
        return ((u + u0 + bend) / period) % 1.0 < 0.5
    if category == "ringed":  # concentric rings about a point near the centre, which is untinted
        cx, cy = rng.uniform(-0.15, 0.15, 2) * period
        return (np.hypot(x - cx, y - cy) / period) % 1.0 >= 0.5
    if category == "speckled":  # blotches: coarse noise, thresholded at its median
        cell = 0.35 * period
        gh = int(np.ceil((y.max() - y.min() + 1) / cell)) + 2
        gw = int(np.ceil((x.max() - x.min() + 1) / cell)) + 2
        grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
        field = np.asarray(grid.resize((int(gw * cell), int(gh * cell)), Image.BICUBIC), np.float32)
        iy = np.clip((y - y.min()).astype(int), 0, field.shape[0] - 1)
        ix = np.clip((x - x.min()).astype(int), 0, field.shape[1] - 1)
        f = field[iy, ix]
        return f > np.median(f)
    if category == "plain":
        return np.zeros_like(x, dtype=bool)
    if category == "gradient":  # the object's colour over a third, then a ramp to the other tone
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        t = t if rng.random() < 0.5 else 1.0 - t
        return np.clip((t - 0.35) / 0.65, 0.0, 1.0)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def _draw(w, h, bg, objs: list[_Obj], rng) -> tuple[Image.Image, np.ndarray]:
    """Image and class mask from the same rasterised silhouettes, then tight boxes from the mask.

    Each silhouette is filled with its category's pattern in its colour and its category's
    accent (``ACCENTS``); the pattern's period is a fraction of the image's longer side
    (``_PERIOD_FRAC``)."""
    ids = Image.new("L", (w, h), 0)
    dm = ImageDraw.Draw(ids)
    for i, o in enumerate(objs):
        dm.polygon([tuple(v) for v in o.poly.tolist()], fill=i + 1)
    idm = np.asarray(ids)
    img = bg.astype(np.float32)
    m = np.zeros((h, w), np.uint8)
    for i, o in enumerate(objs):
        # Boxes of different objects are >= 3 px apart, so a 1 px margin window sees only this one.
        lo, hi = o.poly.min(0), o.poly.max(0)
        x0, y0 = max(int(math.floor(lo[0])) - 1, 0), max(int(math.floor(lo[1])) - 1, 0)
        x1, y1 = min(int(math.ceil(hi[0])) + 2, w), min(int(math.ceil(hi[1])) + 2, h)
        ys, xs = np.nonzero(idm[y0:y1, x0:x1] == i + 1)
        o.box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        ys, xs = ys + y0, xs + x0
        centre = (lo + hi) / 2
        period = max(_MIN_PERIOD, rng.uniform(*_PERIOD_FRAC) * max(w, h))
        t = _pattern(o.category, xs + 0.5 - centre[0], ys + 0.5 - centre[1], period, rng)
        t = np.asarray(t, np.float32)[:, None]
        fill = np.asarray(o.fill, np.float32)
        accent = ACCENTS[o.category]
        second = fill if accent is None else np.asarray(accent, np.float32) + rng.integers(-12, 13, 3)
        img[ys, xs] = fill * (1 - t) + second * t
        m[ys, xs] = CATEGORIES.index(o.category) + 1
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)), m
