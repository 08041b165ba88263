"""How many samples does the demo's tiny image tower need to learn an attribute *with labels*?

The default job can only learn, contrastively, what its image tower can see within the job's
sample budget. This script measures that with the most direct signal there is: it trains the
tiny ViT (`conf/model/tiny.yaml`: 64 px, patch 8, 4 x 128, MAP head) supervised, with a
linear head and a multi-label BCE on which values of one attribute (`--attribute category |
color`) the objects of each train image carry, and reports top-1 on the demo's held-out
single-object zero-shot set (`eval/zeroshot`) for that attribute. Two reference rows train on the
same batches with the same schedule: timm's ViT of the same shape (MAP pooling, no class
token), and a 3-layer CNN (the locality a ViT lacks). It was used to choose the demo's
category cue: first a fill pattern (demo format 3), then the glyphs of format 4; see
`benchmarks/RESULTS.md`. (The earlier rows' `--attribute shape` read format 3's shapes.)

    python benchmarks/demo_probe.py --attribute category              # 470 x 64 = 30k samples
    python benchmarks/demo_probe.py --quick                           # 40 steps on a 200-image demo
    python benchmarks/demo_probe.py --world glyphs --steps 235        # issue 28's candidate: 15k samples

`--world glyphs` draws the scenes in memory instead (`siglip2.data.demo.glyphs`: 1-3 glyphs
from DejaVu fonts per train image, 800 single-glyph held-out images, 80 per glyph), the
attribute being the glyph; `--glyph-*` options choose the layout, background, ink, glyph set
and fonts. The cue chosen for issue 28 (0.97 at 15k samples, RESULTS.md "Step 2"):

    python benchmarks/demo_probe.py --world glyphs --num-train 15040 --steps 235 --lr 1e-3 \
        --glyph-background black --glyph-ink pastel --glyph-fonts 3 --glyph-sizes large \
        --glyph-set AEHKMOSVXZ --glyph-max 1 --glyph-aspect 1

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

from siglip2.data.demo import CATEGORIES, COLORS, ensure_demo  # noqa: E402
from siglip2.model.vit import VisionConfig, VisionTransformer  # noqa: E402

VALUES = {"category": CATEGORIES, "color": tuple(COLORS)}
TEST_SET = {"category": "zeroshot", "color": "zeroshot"}


def glyph_split(
    n: int,
    size: int,
    seed: int,
    single: bool,
    max_glyphs: int = 3,
    sizes: tuple[str, ...] = ("small", "medium", "large"),
    max_aspect: float = 2.0,
    num_fonts: int | None = None,
    centred: bool = False,
    cells: int | None = None,
    background: str = "demo",
    ink: str = "palette",
    alphabet: str = "0123456789",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) uint8 squashed glyph scenes and (n, 10) glyph-presence targets:
    1-`max_glyphs` glyphs per image, or (`single`) one glyph per image, the glyphs in turn;
    glyph sizes drawn from `sizes`."""
    from siglip2.data.demo.glyphs import draw_glyph_scene, glyph_scene_size

    rng = np.random.default_rng(seed)
    images, targets = [], []
    for i in range(n):
        w, h = glyph_scene_size(rng, max_aspect=max_aspect)
        force = alphabet[i % len(alphabet)] if single else None
        img, _, glyphs = draw_glyph_scene(
            rng,
            w,
            h,
            1 if single else int(rng.integers(1, max_glyphs + 1)),
            force,
            sizes,
            num_fonts=num_fonts,
            centred=centred,
            cells=cells,
            background=background,
            ink=ink,
            alphabet=alphabet,
        )
        target = np.zeros(len(alphabet), np.float32)
        for g in glyphs:
            target[alphabet.index(g.glyph)] = 1.0
        images.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
        targets.append(target)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(targets))


def word_split(n: int, size: int, seed: int, layouts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) uint8 word images squashed to a square and (n, 10) one-hot word targets:
    the words of ``glyphs.WORDS`` in turn, each in a layout of `layouts` drawn at random
    (``glyphs.draw_word``: row/column aspect log-uniform in 2..4, short side 40-96 px, the
    demo's first 3 fonts, pastel ink on black)."""
    from siglip2.data.demo.glyphs import WORDS, _font_paths, draw_word
    from siglip2.data.demo.world import COLORS as PALETTE

    rng = np.random.default_rng(seed)
    colors, fonts = [c for c in PALETTE if c != "black"], _font_paths()[:3]  # the demo's inks
    images, targets = [], []
    for i in range(n):
        # a float draw whatever the layouts, so one seed gives the same words, colours and sizes
        word, layout = WORDS[i % len(WORDS)], layouts[int(rng.random() * len(layouts))]
        aspect = math.exp(rng.uniform(math.log(2.0), math.log(4.0)))
        img, _, _ = draw_word(
            rng,
            word,
            layout,
            int(rng.integers(40, 97)),
            aspect,
            colors[int(rng.integers(len(colors)))],
            fonts[int(rng.integers(len(fonts)))],
        )
        target = np.zeros(len(WORDS), np.float32)
        target[i % len(WORDS)] = 1.0
        images.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
        targets.append(target)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(targets))


def load_split(pattern: str, size: int, attribute: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) uint8 images and (N, len(VALUES[attribute])) presence targets."""
    names = VALUES[attribute]
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
            target = np.zeros(len(names), np.float32)
            for obj in meta["objects"]:
                target[names.index(obj[attribute])] = 1.0
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

        self.vit = TimmViT(
            img_size=size,
            patch_size=patch,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp / width,
            global_pool="map",
            class_token=False,
            num_classes=0,
        )

    def forward(self, x):
        return self.vit(x)


class SmallCNN(torch.nn.Module):
    """Three 3x3 conv + BN + ReLU + max-pool stages (32, 64, 128 channels), global average pool."""

    def __init__(self, width: int = 128):
        super().__init__()
        layers, c = [], 3
        for out in (32, 64, width):
            layers += [
                torch.nn.Conv2d(c, out, 3, padding=1),
                torch.nn.BatchNorm2d(out),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
            c = out
        self.body = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).mean((2, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attribute", choices=sorted(VALUES), default="category")
    ap.add_argument(
        "--world",
        choices=("demo", "glyphs", "words"),
        default="demo",
        help="demo: the built demo's shards; glyphs: issue 28's glyph scenes, drawn in memory; "
        "words: glyphs.WORDS in --word-layouts, drawn in memory",
    )
    ap.add_argument(
        "--word-layouts",
        default="row,column",
        help="--world words: comma-separated layouts of glyphs.draw_word (row, column, grid)",
    )
    ap.add_argument("--glyph-max", type=int, default=3, help="--world glyphs: at most this many glyphs per image")
    ap.add_argument("--glyph-sizes", default="small,medium,large", help="--world glyphs: the sizes drawn")
    ap.add_argument("--glyph-aspect", type=float, default=2.0, help="--world glyphs: images up to this aspect")
    ap.add_argument("--glyph-fonts", type=int, default=None, help="--world glyphs: only the first N fonts")
    ap.add_argument("--glyph-centred", action="store_true", help="--world glyphs: each glyph at the centre")
    ap.add_argument(
        "--glyph-cells",
        type=int,
        default=None,
        help="--world glyphs: blocky glyphs drawn this many cells tall, then enlarged",
    )
    ap.add_argument(
        "--glyph-background",
        choices=("demo", "black", "flat"),
        default="demo",
        help="--world glyphs: the demo's textured backgrounds, black, or one flat muted colour",
    )
    ap.add_argument(
        "--glyph-ink",
        choices=("palette", "white", "pastel"),
        default="palette",
        help="--world glyphs: glyph colour: the palette's, white, or the palette's mixed with white",
    )
    ap.add_argument("--glyph-set", default="0123456789", help="--world glyphs: the glyphs (one class each)")
    ap.add_argument("--root", default=None, help="demo folder (default: the training cache's, by --num-train)")
    ap.add_argument("--num-train", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=470)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--evals", type=int, default=5, help="evaluate this many times, evenly spaced")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="ours,timm,cnn", help="comma-separated subset of ours,timm,cnn")
    ap.add_argument("--image-size", type=int, default=None, help="default: conf/model/tiny.yaml's")
    ap.add_argument("--patch", type=int, default=None, help="default: conf/model/tiny.yaml's")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.num_train, args.steps, args.batch, args.evals = 200, 40, 16, 2
    if args.root is None:  # conf/paths + conf/data/demo.yaml's cache path
        cache = os.environ.get("SIGLIP2_CACHE", str(Path.home() / ".cache" / "siglip2"))
        args.root = str(Path(cache) / f"demo-n{args.num_train}-s0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.world == "demo" and not (Path(args.root) / "DONE.json").is_file():  # a finished demo is read as it is
        ensure_demo(
            args.root,
            num_train=args.num_train,
            **(
                {"num_zeroshot": 40, "num_retrieval": 8, "num_refexp": 8, "num_segmentation": 8, "num_words": 8}
                if args.quick
                else {}
            ),
        )
    import yaml

    tiny = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())["vision"]
    cfg = dict(
        size=args.image_size or tiny["image_size"],
        patch=args.patch or tiny["patch_size"],
        width=tiny["width"],
        depth=tiny["depth"],
        heads=tiny["heads"],
        mlp=tiny["mlp_dim"],
    )
    print("tower:", cfg)
    t0 = time.time()
    if args.world == "words":
        from siglip2.data.demo.glyphs import WORDS

        args.attribute = "word"
        VALUES["word"] = WORDS
        layouts = tuple(args.word_layouts.split(","))
        x_train, y_train = word_split(min(args.num_train, args.steps * args.batch), cfg["size"], 0, layouts)
        x_test, y_test = word_split(80 if args.quick else 800, cfg["size"], 1, layouts)
    elif args.world == "glyphs":
        if len(set(args.glyph_set)) != len(args.glyph_set) or len(args.glyph_set) < 2:
            ap.error(f"--glyph-set needs at least two distinct glyphs, got {args.glyph_set!r}")
        args.attribute = "glyph"
        VALUES["glyph"] = tuple(args.glyph_set)
        sizes = tuple(args.glyph_sizes.split(","))
        kw = dict(
            sizes=sizes,
            max_aspect=args.glyph_aspect,
            num_fonts=args.glyph_fonts,
            centred=args.glyph_centred,
            cells=args.glyph_cells,
            background=args.glyph_background,
            ink=args.glyph_ink,
            alphabet=args.glyph_set,
        )
        x_train, y_train = glyph_split(
            min(args.num_train, args.steps * args.batch), cfg["size"], 0, single=False, max_glyphs=args.glyph_max, **kw
        )
        x_test, y_test = glyph_split(80 if args.quick else 800, cfg["size"], 1, single=True, **kw)
    else:
        x_train, y_train = load_split(str(Path(args.root) / "train" / "*.tar"), cfg["size"], args.attribute)
        x_test, y_test = load_split(
            str(Path(args.root) / "eval" / TEST_SET[args.attribute] / "*.tar"), cfg["size"], args.attribute
        )
    n_values = y_train.shape[1]
    print(
        f"attribute {args.attribute}: {n_values} values; loaded {len(x_train)} train / {len(x_test)} "
        f"held-out single-object images in {time.time() - t0:.0f} s"
    )

    towers = {
        "ours": VisionTransformer(
            VisionConfig(
                width=cfg["width"],
                depth=cfg["depth"],
                mlp_dim=cfg["mlp"],
                heads=cfg["heads"],
                patch_size=cfg["patch"],
                posemb_grid=cfg["size"] // cfg["patch"],
                image_size=cfg["size"],
            )
        ),
        "timm": TimmPeer(**cfg),
        "cnn": SmallCNN(cfg["width"]),
    }
    towers = {k: v for k, v in towers.items() if k in args.models.split(",")}
    pooled = {"ours": lambda m, x: m(x).pooled, "timm": lambda m, x: m(x), "cnn": lambda m, x: m(x)}
    heads = {k: torch.nn.Linear(cfg["width"], n_values) for k in towers}
    opts = {
        k: torch.optim.AdamW(
            [*towers[k].parameters(), *heads[k].parameters()],
            lr=args.lr,
            betas=(0.9, 0.95),
            weight_decay=1e-4 / args.lr,
        )
        for k in towers
    }
    warmup = max(1, round(0.05 * args.steps))

    def lr_at(step: int) -> float:  # the training config's schedule: linear warmup, cosine to 0
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - 0.5) / 0.5

    @torch.no_grad()
    def predict(name: str) -> torch.Tensor:
        towers[name].eval()
        preds = [
            heads[name](pooled[name](towers[name], norm(x_test[i : i + 200]))).argmax(1)
            for i in range(0, len(x_test), 200)
        ]
        towers[name].train()
        return torch.cat(preds)

    def accuracy(name: str) -> str:
        if name not in towers:
            return "-"
        return f"{float((predict(name) == y_test.argmax(1)).float().mean()):.3f}"

    every = max(1, args.steps // args.evals)
    print(
        f"{'step':>6} {'samples':>8} {'ours top-1':>11} {'timm top-1':>11} {'cnn top-1':>10}   "
        f"(chance {1 / n_values:.3f})"
    )
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
            print(
                f"{step + 1:>6} {(step + 1) * args.batch:>8} {accuracy('ours'):>11} {accuracy('timm'):>11} "
                f"{accuracy('cnn'):>10}",
                flush=True,
            )
    names = VALUES[args.attribute]
    truth = y_test.argmax(1)
    print("per-class top-1 at the end (rows: models; columns: " + ", ".join(names) + ")")
    for name in towers:
        pred = predict(name)
        accs = [
            float((pred[truth == c] == c).float().mean()) if (truth == c).any() else float("nan")
            for c in range(len(names))
        ]
        print(f"  {name:>5} " + " ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    main()
