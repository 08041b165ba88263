"""A picture of NaFlex evaluation, for a person to look at: elongated held-out images as the
model sees them at several sequence lengths.

One row per image of a zero-shot set (only images at least `aspect_min` elongated): the
decoded image, then for each sequence length the image at the size NaFlex gives it
(`siglip2.data.naflex.image_size_for_max_patches`: its own aspect ratio, at most that many
patches), with the patch grid drawn over it, the grid (h x w patches, padding), and the top
zero-shot class at that length (ok / WRONG). Used by
``python eval.py ckpt_path=... eval.naflex_seq_len=64 grid=PATH.png eval.grid_seq_lens=[32,64,144]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw

from siglip2.data.naflex import pad_patches, patchify_image, resize_for_max_patches
from siglip2.data.shards import DecodedSample, build_eval_loader
from siglip2.eval.grid import _font
from siglip2.eval.suite import _encode, load_eval_set
from siglip2.eval.zeroshot import build_classifier, zeroshot_logits


@torch.no_grad()
def render_naflex_predictions(
    zeroshot_yaml: str,
    model: torch.nn.Module,
    tokenizer,
    patch_size: int,
    seq_lens: Sequence[int],
    out_png: str,
    aspect_min: float | None = 1.6,
    n: int = 8,
    cell: int = 160,
    device: str | torch.device = "cpu",
) -> str:
    """Writes the grid (n rows, 1 + len(seq_lens) columns of `cell` px) to `out_png`.

    Raises ValueError when the set has no labelled image at least `aspect_min` elongated."""
    es = load_eval_set(zeroshot_yaml)
    seq_lens = [int(s) for s in seq_lens]

    def sample_fn(s: DecodedSample) -> dict[str, Any] | None:
        w, h = s.image.size
        if (aspect_min and max(w / h, h / w) < aspect_min) or es.label_key not in (s.meta or {}):
            return None
        from torchvision.transforms.v2 import functional as TF

        return {"pixels": TF.pil_to_tensor(s.image.convert("RGB")), "label": int(s.meta[es.label_key])}

    samples = []
    for batch in build_eval_loader(es.urls, sample_fn, batch_size=1, num_workers=0):
        if "pixels" not in batch:  # a batch that only carries skip counts
            continue
        samples.append((batch["pixels"][0], int(batch["label"][0])))
        if len(samples) == n:
            break
    if not samples:
        raise ValueError(f"{zeroshot_yaml}: no labelled image at least {aspect_min} elongated")
    model.eval()
    classifier = build_classifier(model.encode_text, tokenizer, es.classnames, es.templates)
    views: dict[int, list[tuple[torch.Tensor, tuple[int, int], int]]] = {}
    for length in seq_lens:  # one NaFlex batch per length, as evaluation builds it
        resized = [resize_for_max_patches(x, patch_size, length) for x, _ in samples]
        batch = pad_patches([patchify_image(x, patch_size) for x in resized], length)
        top = zeroshot_logits(_encode(model, batch, device).embeds, classifier).argmax(-1).tolist()
        views[length] = [
            (x, tuple(int(v) for v in shape), t) for x, shape, t in zip(resized, batch["spatial_shapes"].tolist(), top)
        ]

    font = _font(11)
    cols, label_h = 1 + len(seq_lens), 30
    grid = Image.new("RGB", (cols * (cell + 4), len(samples) * (cell + label_h + 4)), (160, 160, 160))
    for row, (pixels, label) in enumerate(samples):
        y0 = row * (cell + label_h + 4)
        tiles = [(pixels, None, None, f"{es.classnames[label]}  {pixels.shape[2]}x{pixels.shape[1]} px")]
        for length in seq_lens:
            x, (gh, gw), top = views[length][row]
            hit = "ok" if top == label else "WRONG"
            tiles.append(
                (
                    x,
                    (gh, gw),
                    length,
                    f"{length} tok: {gh}x{gw}, pad {length - gh * gw}\ntop-1 {es.classnames[top]} ({hit})",
                )
            )
        for col, (x, shape, _, text) in enumerate(tiles):
            tile = Image.new("RGB", (cell, cell + label_h), (255, 255, 255))
            h, w = x.shape[1], x.shape[2]
            scale = cell / max(h, w)  # the whole view, aspect kept, nearest: pixels stay visible
            img = Image.fromarray(x.permute(1, 2, 0).numpy()).resize(
                (max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST
            )
            tile.paste(img, (0, 0))
            d = ImageDraw.Draw(tile)
            if shape is not None:  # the patch grid the tower sees
                gh, gw = shape
                for i in range(1, gw):
                    d.line([(i * patch_size * scale, 0), (i * patch_size * scale, img.height - 1)], fill=(255, 255, 0))
                for j in range(1, gh):
                    d.line([(0, j * patch_size * scale), (img.width - 1, j * patch_size * scale)], fill=(255, 255, 0))
            d.multiline_text((2, cell + 1), text, fill=(0, 0, 0), font=font)
            grid.paste(tile, (col * (cell + 4), y0))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png
