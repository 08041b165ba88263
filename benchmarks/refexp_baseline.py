"""What a referring-expression set gives away: acc@0.5 of boxes that ignore the expression.

Issue 28's refexp instrument must beat a constant-box baseline by at least 3x before a LocCa
comparison on it means anything. This scores, on a refexp eval set (every region of every
image is one query, as `siglip2.eval.suite._refexp` scores the decoder), with the same IoU rule
(`siglip2.eval.refexp.refexp_accuracy`, IoU >= 0.5):

- `mean train box`: one box for every query, the coordinate-wise mean of the train split's
  region boxes (the best a decoder that ignores image and text can learn under an L2 view);
- `median train box`: the coordinate-wise median instead;
- `oracle constant`: the best of 400 candidate boxes (a 20 x 20 grid of centres, each with
  the train boxes' median size) chosen *on the eval set itself*: an upper bound for any
  constant predictor;
- `right box, wrong object`: the box of another region of the same image (the expression
  ignored, the image used): what reading the image without the words can reach.

    python benchmarks/refexp_baseline.py --root ~/.cache/siglip2/demo-n20000-s0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from glob import glob
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siglip2.eval.refexp import refexp_accuracy  # noqa: E402


def read_regions(pattern: str, limit: int | None = None) -> list[list[list[float]]]:
    """Each image's region boxes (normalised x1y1x2y2), read from the shards' json members."""
    import tarfile

    out: list[list[list[float]]] = []
    for path in sorted(glob(pattern)):
        with tarfile.open(path) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    out.append([r["box"] for r in meta.get("regions", [])])
                    if limit and len(out) >= limit:
                        return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="a built demo (siglip2.data.demo.ensure_demo)")
    ap.add_argument("--set", default="refexp", help="the eval split under ROOT/eval")
    ap.add_argument("--num-train", type=int, default=5000, help="train images whose boxes make the constants")
    args = ap.parse_args()
    train = [b for img in read_regions(os.path.join(args.root, "train", "*.tar"), args.num_train) for b in img]
    images = read_regions(os.path.join(args.root, "eval", args.set, "*.tar"))
    gt = [b for img in images for b in img]
    if not train or not gt:
        sys.exit(f"no regions under {args.root} (train {len(train)}, {args.set} {len(gt)})")
    tb = np.array(train)
    rows = {}
    for name, box in (("mean train box", tb.mean(0)), ("median train box", np.median(tb, 0))):
        rows[name] = (refexp_accuracy([box.tolist()] * len(gt), gt), [round(float(v), 3) for v in box])
    w, h = np.median(tb[:, 2] - tb[:, 0]), np.median(tb[:, 3] - tb[:, 1])
    best, best_box = -1.0, None
    for cx in np.linspace(w / 2, 1 - w / 2, 20):
        for cy in np.linspace(h / 2, 1 - h / 2, 20):
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            acc = refexp_accuracy([box] * len(gt), gt)
            if acc > best:
                best, best_box = acc, [round(float(v), 3) for v in box]
    rows["oracle constant (chosen on this set)"] = (best, best_box)
    other = [img[(i + 1) % len(img)] for img in images for i in range(len(img))]
    rows["right box, wrong object"] = (refexp_accuracy(other, gt) if len(other) == len(gt) else float("nan"), None)
    print(f"{args.set}: {len(images)} images, {len(gt)} queries; constants from {len(train)} train regions")
    print("| baseline | acc@0.5 | box |\n|---|---|---|")
    for name, (acc, box) in rows.items():
        print(f"| {name} | {acc:.3f} | {box if box is not None else '-'} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
