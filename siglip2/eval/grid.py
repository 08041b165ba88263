"""A picture of what a trained model does on held-out images, for a person to look at.

For each image of a zero-shot set whose json carries ``regions`` (the demo's sets do): the
image with its ground-truth box (green) and the box the LocCa decoder predicts for the
region caption (red, ARef), the top zero-shot class next to the label, and the caption the
decoder generates (Cap). A legend strip (`LEGEND_HEIGHT` px) on top says what each mark is.
Used by ``python eval.py ckpt_path=... grid=PATH.png``.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from siglip2.data.shards import DecodedSample, build_eval_loader
from siglip2.data.transforms import ImageTransform
from siglip2.eval.captioning import generate_captions
from siglip2.eval.refexp import predict_boxes
from siglip2.eval.suite import load_eval_set
from siglip2.eval.zeroshot import build_classifier, zeroshot_logits


LEGEND_HEIGHT = 20


def _legend(width: int, font, decoder: bool) -> Image.Image:
    """The strip that says what the boxes and lines mean."""
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (255, 255, 255))
    d = ImageDraw.Draw(strip)
    x = 4
    for colour, text in (((0, 200, 0), "true box of 'box for'"), ((255, 0, 0), "box LocCa predicts for it")):
        d.rectangle([x, 4, x + 12, 15], outline=colour, width=2)
        d.text((x + 17, 3), text, fill=(0, 0, 0), font=font)
        x += 22 + int(d.textlength(text, font=font)) + 12
    rest = (
        "top-1: zero-shot class; caption: LocCa's own caption"
        if decoder
        else "top-1: zero-shot class (no LocCa decoder: no boxes, no captions)"
    )
    d.text((x, 3), rest, fill=(0, 0, 0), font=font)
    return strip


def _font(size: int):
    path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    return ImageFont.truetype(path, size) if Path(path).exists() else ImageFont.load_default()


@torch.no_grad()
def render_predictions(
    zeroshot_yaml: str,
    model: torch.nn.Module,
    decoder: torch.nn.Module | None,
    tokenizer,
    image_size: int,
    out_png: str,
    n: int = 16,
    cols: int = 4,
    cell: int = 224,
) -> str:
    """Writes a grid of ``n`` images (``cols`` per row, ``cell`` px each) to ``out_png``.

    Raises ValueError when the set has no image with a region (nothing to draw boxes for)."""
    es = load_eval_set(zeroshot_yaml)
    transform = ImageTransform(image_size)

    def sample_fn(s: DecodedSample) -> dict[str, Any] | None:
        regions = (s.meta or {}).get("regions") or []
        if not regions or es.label_key not in s.meta:
            return None
        image, _ = transform(s.image, None)
        return {"image": image, "label": int(s.meta[es.label_key]), "region": regions[0]}

    model.eval()
    classifier = build_classifier(model.encode_text, tokenizer, es.classnames, es.templates)
    batch = next(iter(build_eval_loader(es.urls, sample_fn, batch_size=n, num_workers=0)), None)
    if batch is None:
        raise ValueError(f"{zeroshot_yaml}: no sample with regions and a label")
    out = model.encode_image(image=batch["image"])
    top = zeroshot_logits(out.embeds, classifier).argmax(-1).tolist()
    captions = boxes = [None] * len(top)
    if decoder is not None:
        captions = generate_captions(decoder, out.tokens, out.token_mask, tokenizer)
        boxes = predict_boxes(decoder, out.tokens, out.token_mask, tokenizer, [r["caption"] for r in batch["region"]])
    font = _font(12)
    tiles = []
    for i in range(len(top)):
        img = ((batch["image"][i].permute(1, 2, 0).float() * 0.5 + 0.5).clamp(0, 1) * 255).byte().numpy()
        tile = Image.new("RGB", (cell, cell + 64), (255, 255, 255))
        tile.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST))
        d = ImageDraw.Draw(tile)
        for box, colour in ((batch["region"][i]["box"], (0, 200, 0)), (boxes[i], (255, 0, 0))):
            if box is not None:
                x1, y1, x2, y2 = (float(v) * cell for v in box)
                d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=2)
        hit = "ok" if top[i] == batch["label"][i] else "WRONG"
        lines = [
            f"label {es.classnames[batch['label'][i]]}; top-1 {es.classnames[top[i]]} ({hit})",
            f"box for: {batch['region'][i]['caption']}",
        ]
        if captions[i] is not None:
            lines += textwrap.wrap(f"caption: {captions[i]}", 36)[:2]
        d.multiline_text((3, cell + 2), "\n".join(lines), fill=(0, 0, 0), font=font)
        tiles.append(tile)
    rows = math.ceil(len(tiles) / cols)
    grid = Image.new("RGB", (cols * (cell + 4), LEGEND_HEIGHT + rows * (cell + 68)), (160, 160, 160))
    grid.paste(_legend(grid.width, font, decoder is not None), (0, 0))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * (cell + 4), LEGEND_HEIGHT + (i // cols) * (cell + 68)))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png
