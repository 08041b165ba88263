"""Draw the self-distillation views (siglip2/data/views.py) of a few demo images in one PNG,
for a person to check them: crops where they should be, flips, jitter that does not destroy
the image, half of the patches masked.

    python benchmarks/render_views.py                        # -> docs/distill_views.png
    python benchmarks/render_views.py --size 64 --patch 8 --local-size 32 --images 4 --seed 0

Images are demo scenes (``siglip2.data.demo.generate_sample``) squashed to ``--size`` as the
training transform does. One row per image: the image with the global crop (white) and the
8 local crops (coloured) drawn on it; the global view; the global view with its masked
patches tinted and the patch grid drawn; the 8 local views, each framed in its box's colour.
"f" marks a flipped view, "g" a grayscale one. Pixels are shown enlarged (nearest).
"""

from __future__ import annotations

import argparse
import colorsys
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from siglip2.data.demo import generate_sample  # noqa: E402
from siglip2.data.demo.view import _font  # noqa: E402
from siglip2.data.transforms import ImageTransform  # noqa: E402
from siglip2.data.views import ViewConfig, make_views  # noqa: E402

CELL = 128
PAD = 6
HEAD = 22


def _pil(x: torch.Tensor, cell: int = CELL) -> Image.Image:
    """(3, h, w) in [-1, 1] -> RGB PIL image enlarged to cell x cell with nearest."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr).resize((cell, cell), Image.NEAREST)


def _colours(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 0.9, 1.0)) for i in range(n)]


def render(out_png: str, n_images: int = 4, size: int = 64, patch: int = 8, local_size: int = 32, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    tf = ImageTransform(size)
    images = torch.stack([tf(generate_sample(rng, int(rng.integers(1, 3)))["image"])[0] for _ in range(n_images)])
    cfg = ViewConfig(local_size=local_size)
    views = make_views(images, torch.Generator().manual_seed(seed), cfg, patch_size=patch)
    n_local, grid = cfg.local_count, size // patch
    local = views.local_views.unflatten(0, (n_local, n_images))
    lboxes = views.local_boxes.unflatten(0, (n_local, n_images))
    lflip = views.local_flip.unflatten(0, (n_local, n_images))
    colours = _colours(n_local)

    cols = 3 + n_local
    canvas = Image.new("RGB", (cols * (CELL + PAD) + PAD, HEAD + n_images * (CELL + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    titles = ["image + crops", f"global {size}px", f"mask {int(cfg.mask_ratio * 100)}% of {grid}x{grid}"]
    titles += [f"local {v} ({local_size}px)" for v in range(n_local)]
    for c, t in enumerate(titles):
        draw.text((PAD + c * (CELL + PAD), 4), t, fill=(0, 0, 0), font=font)

    def is_gray(x: torch.Tensor) -> bool:
        return bool((x[0] == x[1]).all() and (x[1] == x[2]).all())

    k = CELL / size  # source pixels -> canvas pixels
    for b in range(n_images):
        y0 = HEAD + b * (CELL + PAD)
        x0 = PAD
        canvas.paste(_pil(images[b]), (x0, y0))
        for v in range(n_local):
            bx = [t * k for t in lboxes[v, b].tolist()]
            draw.rectangle([x0 + bx[0], y0 + bx[1], x0 + bx[2] - 1, y0 + bx[3] - 1], outline=colours[v])
        gx = [t * k for t in views.global_boxes[b].tolist()]
        draw.rectangle([x0 + gx[0], y0 + gx[1], x0 + gx[2] - 1, y0 + gx[3] - 1], outline=(255, 255, 255), width=2)

        g = views.global_view[b]
        x0 += CELL + PAD
        canvas.paste(_pil(g), (x0, y0))
        tag = ("f" if views.global_flip[b] else "") + ("g" if is_gray(g) else "")
        if tag:
            draw.text((x0 + 3, y0 + 2), tag, fill=(255, 255, 0), font=font, stroke_width=1, stroke_fill=(0, 0, 0))

        x0 += CELL + PAD
        base = _pil(g).convert("RGBA")
        tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
        tdraw = ImageDraw.Draw(tint)
        step = CELL / grid
        for i in range(grid * grid):
            r, c = divmod(i, grid)  # row-major (y, x), as the patch tokens
            box = [c * step, r * step, (c + 1) * step - 1, (r + 1) * step - 1]
            if views.mask[b, i]:
                tdraw.rectangle(box, fill=(255, 0, 255, 150))
            tdraw.rectangle(box, outline=(0, 0, 0, 90))
        canvas.paste(Image.alpha_composite(base, tint).convert("RGB"), (x0, y0))

        for v in range(n_local):
            x0 += CELL + PAD
            canvas.paste(_pil(local[v, b]), (x0, y0))
            draw.rectangle([x0 - 2, y0 - 2, x0 + CELL + 1, y0 + CELL + 1], outline=colours[v], width=2)
            tag = ("f" if lflip[v, b] else "") + ("g" if is_gray(local[v, b]) else "")
            if tag:
                draw.text((x0 + 3, y0 + 2), tag, fill=(255, 255, 0), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    canvas.save(out_png)
    return out_png


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "distill_views.png"))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(render(a.out, a.images, a.size, a.patch, a.local_size, a.seed))


if __name__ == "__main__":
    main()
