"""Draw the demo's word images as a model sees them, in one PNG, for a person to check that
the square resize merges the letters and NaFlex keeps them (issue 28).

    python benchmarks/render_words.py                 # -> docs/demo_words_views.png
    python benchmarks/render_words.py --rows 6 --seed 0 --seq-len 64 --size 64 --patch 8

One row per word (``siglip2.data.demo.generate_word_sample``: rows of the elongated set's
layouts, alternating row and column): the image as drawn; the fixed model's input (squashed
to ``--size`` px, antialiased bilinear as training does); NaFlex's input at ``--seq-len``
patches (``siglip2.data.naflex.resize_for_max_patches``: own aspect ratio) with its patch
grid; and the same draw laid out 2 x 2 (``words_square``) squashed to ``--size``. The model
inputs are shown enlarged (nearest) at one scale per pixel; the drawn image is shrunk to fit.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from siglip2.data.demo import generate_word_sample  # noqa: E402
from siglip2.data.demo.view import _font  # noqa: E402
from siglip2.data.naflex import resize_for_max_patches  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "demo_words_views.png"))
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="the fixed model's square input (px)")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64, help="NaFlex's patch budget")
    ap.add_argument("--zoom", type=int, default=3)
    a = ap.parse_args(argv)
    z, font = a.zoom, _font(14)
    cols = [
        ("drawn", 260),
        (f"squashed {a.size} px", a.size * z),
        (f"NaFlex {a.seq_len} patches", 0),
        (f"2x2, squashed {a.size} px", a.size * z),
    ]
    rows = []
    for i in range(a.rows):
        layout = ("row", "column")[i % 2]
        s = generate_word_sample(np.random.default_rng([a.seed, i]), layout, lang="en")
        g = generate_word_sample(np.random.default_rng([a.seed, i]), "grid", lang="en")
        img = s["image"]
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        nf = resize_for_max_patches(t, a.patch, a.seq_len).permute(1, 2, 0).numpy()
        nf_img = Image.fromarray(nf).resize((nf.shape[1] * z, nf.shape[0] * z), Image.NEAREST)
        d = ImageDraw.Draw(nf_img)
        for x in range(0, nf_img.width + 1, a.patch * z):
            d.line([(x, 0), (x, nf_img.height)], fill=(90, 90, 90))
        for y in range(0, nf_img.height + 1, a.patch * z):
            d.line([(0, y), (nf_img.width, y)], fill=(90, 90, 90))
        sq = img.resize((a.size, a.size), Image.BILINEAR).resize((a.size * z, a.size * z), Image.NEAREST)
        gq = g["image"].resize((a.size, a.size), Image.BILINEAR).resize((a.size * z, a.size * z), Image.NEAREST)
        drawn = img.copy()
        drawn.thumbnail((260, 260))
        label = (
            f"{s['meta']['word']['text']} ({layout}, {img.width}x{img.height}; "
            f"NaFlex {nf.shape[1] // a.patch}x{nf.shape[0] // a.patch} patches)"
        )
        rows.append((label, [drawn, sq, nf_img, gq]))
    widths = [max(c[1], max(r[1][k].width for r in rows)) for k, c in enumerate(cols)]
    heights = [max(p.height for p in r[1]) for r in rows]
    pad, head, cap = 10, 22, 20
    W = sum(widths) + pad * (len(cols) + 1)
    H = head + sum(h + cap + pad for h in heights) + pad
    canvas = Image.new("RGB", (W, H), (40, 40, 40))
    d = ImageDraw.Draw(canvas)
    x = pad
    for (name, _), w in zip(cols, widths):
        d.text((x, 4), name, fill=(230, 230, 230), font=font)
        x += w + pad
    y = head
    for (label, pics), h in zip(rows, heights):
        d.text((pad, y), label, fill=(230, 230, 230), font=font)
        x = pad
        for p, w in zip(pics, widths):
            canvas.paste(p, (x, y + cap))
            x += w + pad
        y += h + cap + pad
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    canvas.save(out)
    print(out)
    return out


if __name__ == "__main__":
    main()
