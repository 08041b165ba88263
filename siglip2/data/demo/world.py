"""The demo's palette and backgrounds: the colour names captions use, and the muted
backgrounds :mod:`.glyphs` can draw on (its ``background="demo"`` option; the demo itself
draws on black since format 4).

Format 3's world of fill-pattern categories on shapes (accent hues, polygons, the
rasteriser) lived here until issue 28 replaced it with glyphs; ``benchmarks/RESULTS.md``
keeps what the probes measured on it, and git history its code.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

# Saturated or extreme colours: backgrounds are muted mid-tones, so every object stands out.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 165, 60),
    "blue": (30, 70, 215),
    "yellow": (245, 215, 25),
    "purple": (135, 50, 175),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
_MIN_COLOR_DIST = 100.0  # RGB distance between an object's colour and the background under it
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)


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
        t = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(a)) + np.arange(h, dtype=np.float32)[
            :, None
        ] * np.float32(np.sin(a))
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
        t = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(a)) + np.arange(h, dtype=np.float32)[
            :, None
        ] * np.float32(np.sin(a))
        on = (np.sin(t * np.float32(2 * np.pi / period)) > 0)[..., None]
        img = np.where(on, c1, c2)
    oy, ox = rng.integers(0, _NOISE.shape[0] - h + 1), rng.integers(0, _NOISE.shape[1] - w + 1)
    img = img + _NOISE[oy : oy + h, ox : ox + w]
    return np.clip(img, 0, 255, out=img).astype(np.uint8), kind
