"""Looking at the demo: :func:`render_grid` draws samples with their boxes, masks and
captions in one PNG, for a person to check that boxes sit on the shapes."""

from __future__ import annotations

import colorsys
import io
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from .glyphs import LETTERS


_MASK_PALETTE = np.array(
    [(0, 0, 0)]
    + [tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / len(LETTERS), 0.8, 1.0)) for i in range(len(LETTERS))],
    dtype=np.uint8,
)


def _font(size: int):
    from PIL import ImageFont

    from .glyphs import font_dir

    for path in (str(font_dir() / "DejaVuSans.ttf"), "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def render_grid(urls, out_png: str, n: int = 16, cols: int = 4, cell: int = 200) -> str:
    """Samples with their region boxes, masks and captions in one PNG, for a person to check
    that boxes sit on the glyphs and captions say what is drawn. Reads through webdataset,
    the way training does. (DejaVu has no CJK/Devanagari glyphs: those captions show boxes.)"""
    import textwrap

    import webdataset as wds

    # decoded by hand: wds' "pil" decoder turns the L-mode mask into RGB
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    font = _font(11)
    tiles = []
    for s in ds:
        meta = json.loads(s["json"])
        caption = s["txt"].decode("utf-8")
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        w, h = img.size
        k = (cell - 4) / max(w, h)
        img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.NEAREST)
        seg = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
        mimg = Image.fromarray(_MASK_PALETTE[seg]).resize(img.size, Image.NEAREST)
        tile = Image.new("RGB", (2 * cell, cell + 70), (255, 255, 255))
        tile.paste(img, (2, 2))
        tile.paste(mimg, (cell + 2, 2))
        d = ImageDraw.Draw(tile)
        for j, r in enumerate(meta["regions"]):
            x1, y1, x2, y2 = r["box"]
            for ox in (2, cell + 2):
                d.rectangle(
                    [ox + x1 * img.width, 2 + y1 * img.height, ox + x2 * img.width - 1, 2 + y2 * img.height - 1],
                    outline=(0, 255, 255) if ox == 2 else (255, 255, 255),
                )
            d.text((2 + x1 * img.width + 1, 2 + y1 * img.height), str(j), fill=(0, 255, 255), font=font)
        label = (
            f"[{meta['lang']} {w}x{h}] "
            + caption
            + " | "
            + "; ".join(f"{j}:{r['caption']}" for j, r in enumerate(meta["regions"]))
        )
        d.multiline_text((2, cell + 2), "\n".join(textwrap.wrap(label, 62)[:5]), fill=(0, 0, 0), font=font)
        tiles.append(tile)
        if len(tiles) >= n:
            break
    if not tiles:
        raise ValueError(f"no samples found in {urls}")
    rows = math.ceil(len(tiles) / cols)
    tw, th = tiles[0].size
    grid = Image.new("RGB", (cols * tw, rows * th), (128, 128, 128))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * tw, (i // cols) * th))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    grid.save(out_png)
    return out_png
