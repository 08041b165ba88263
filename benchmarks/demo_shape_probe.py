"""How many samples does the demo's image tower need to learn shapes *with labels*?

The default job's zero-shot shape accuracy stays near chance (README "Results"). This script
asks whether that is the contrastive objective's fault or the budget's: it trains the same
tiny ViT (`conf/model/tiny.yaml`: 64 px, patch 8, 4 x 128) supervised, with a linear head and a
multi-label BCE on which of the 8 shapes each train image holds, and reports top-1 on the
demo's held-out single-object zero-shot set (chance 12.5%) at a few sample counts. A peer
row trains timm's ViT of the same shape (MAP pooling, no class token) alongside, so our tower
is compared with the reference at equal steps. Labels are the most direct signal for shape
there is, so this is a reference for what the contrastive towers can hope to learn about
shape from the same number of samples.

    python benchmarks/demo_shape_probe.py              # 3200 steps x 64 (205k samples), ~25 min, 1 thread
    python benchmarks/demo_shape_probe.py --quick      # 40 steps on a 200-image demo (< 1 min)

Reads the shards' .jpg and .json members only (no pickle), squashed to a square as training
does (PIL's antialiased bilinear resize), all into memory as uint8.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import time
from glob import glob
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siglip2.data.demo import SHAPES, ensure_demo  # noqa: E402
from siglip2.model.vit import VisionConfig, VisionTransformer  # noqa: E402


def load_split(pattern: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) uint8 images and (N, len(SHAPES)) shape-presence targets."""
    images, targets = [], []
    for path in sorted(glob(pattern)):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if ext in ("jpg", "json"):
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            meta = json.loads(parts["json"])
            target = np.zeros(len(SHAPES), np.float32)
            for obj in meta["objects"]:
                target[obj["class_id"]] = 1.0
            img = Image.open(io.BytesIO(parts["jpg"])).convert("RGB").resize((size, size), Image.BILINEAR)
            images.append(np.asarray(img))
            targets.append(target)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(targets))


class TimmPeer(torch.nn.Module):
    """timm's ViT of the same shape, returning the pooled feature like our tower's `.pooled`."""

    def __init__(self, size: int, patch: int, width: int, depth: int, heads: int, mlp: int):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        self.vit = TimmViT(img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                           mlp_ratio=mlp / width, global_pool="map", class_token=False, num_classes=0)

    def forward(self, x):
        return self.vit(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="demo folder (default: the training cache's, by --num-train)")
    ap.add_argument("--num-train", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=3200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--evals", type=int, default=4, help="evaluate this many times, evenly spaced")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.num_train, args.steps, args.batch, args.evals = 200, 40, 16, 2
    if args.root is None:  # conf/paths + conf/data/demo.yaml's cache path
        cache = os.environ.get("SIGLIP2_CACHE", str(Path.home() / ".cache" / "siglip2"))
        args.root = str(Path(cache) / f"demo-n{args.num_train}-s0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    demo = ensure_demo(args.root, num_train=args.num_train,
                       **({"num_zeroshot": 40, "num_retrieval": 8, "num_refexp": 8, "num_segmentation": 8}
                          if args.quick else {}))
    cfg = dict(size=64, patch=8, width=128, depth=4, heads=4, mlp=512)  # conf/model/tiny.yaml
    t0 = time.time()
    x_train, y_train = load_split(str(Path(demo.root) / "train" / "*.tar"), cfg["size"])
    x_test, y_test = load_split(str(Path(demo.root) / "eval" / "zeroshot" / "*.tar"), cfg["size"])
    print(f"loaded {len(x_train)} train / {len(x_test)} zero-shot images in {time.time() - t0:.0f} s")

    towers = {
        "ours": VisionTransformer(VisionConfig(width=cfg["width"], depth=cfg["depth"], mlp_dim=cfg["mlp"],
                                               heads=cfg["heads"], patch_size=cfg["patch"],
                                               posemb_grid=cfg["size"] // cfg["patch"], image_size=cfg["size"])),
        "timm": TimmPeer(**cfg),
    }
    pooled = {"ours": lambda m, x: m(x).pooled, "timm": lambda m, x: m(x)}
    heads = {k: torch.nn.Linear(cfg["width"], len(SHAPES)) for k in towers}
    opts = {k: torch.optim.AdamW([*towers[k].parameters(), *heads[k].parameters()], lr=args.lr,
                                 betas=(0.9, 0.95), weight_decay=1e-4 / args.lr) for k in towers}
    warmup = max(1, round(0.05 * args.steps))

    def lr_at(step: int) -> float:  # the training config's schedule: linear warmup, cosine to 0
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - 0.5) / 0.5

    @torch.no_grad()
    def accuracy(name: str) -> float:
        towers[name].eval()
        hits = 0
        for i in range(0, len(x_test), 200):
            logits = heads[name](pooled[name](towers[name], norm(x_test[i:i + 200])))
            hits += int((logits.argmax(1) == y_test[i:i + 200].argmax(1)).sum())
        towers[name].train()
        return hits / len(x_test)

    every = max(1, args.steps // args.evals)
    print(f"{'step':>6} {'samples':>8} {'ours top-1':>11} {'timm top-1':>11}   (chance {1 / len(SHAPES):.3f})")
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=gen)
        batch, target = norm(x_train[idx]), y_train[idx]
        for name in towers:  # same batches, same schedule, alternating
            for group in opts[name].param_groups:
                group["lr"] = lr_at(step)
            loss = F.binary_cross_entropy_with_logits(heads[name](pooled[name](towers[name], batch)), target)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*towers[name].parameters(), *heads[name].parameters()], 1.0)
            opts[name].step()
        if (step + 1) % every == 0 or step + 1 == args.steps:
            print(f"{step + 1:>6} {(step + 1) * args.batch:>8} {accuracy('ours'):>11.3f} {accuracy('timm'):>11.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
