"""Does the contrastive job itself learn issue 28's glyph cue zero-shot?

`benchmarks/demo_probe.py` showed a *supervised* probe of the tiny image tower reading one large
glyph anywhere in a square image at 0.97 top-1 after 15k samples (benchmarks/RESULTS.md, "Step 2:
what the tiny tower needs to read a glyph (issue 28)": letters AEHKMOSVXZ, the first 3 (bold
DejaVu) fonts, black background, pastel ink). This measures what `train.py` reaches on the same
scenes from captions alone: the default job (stage=pretrain, model=tiny, batch 32, 750 steps =
24k samples), scored by zero-shot top-1 over the 10 letters (chance 0.10).

This script writes, under OUT:
- `train/{000000..000023}.tar`: ~24k scenes in img2dataset layout (`jpg`, `txt`, `json` with
  LocCa `regions`), from `siglip2.data.demo.glyphs.draw_glyph_scene`. `--variant single`: one
  large glyph, square (the probe's layout); `multi`: 1-3 glyphs, medium and large, aspect up to 2.
  Captions name each glyph's size, colour and letter: "a photo of a large red letter K and ...".
- `eval_single/eval_single.yaml` (+ shards): 800 held-out single-glyph square images, one large
  glyph, 80 per letter (the probe's held-out set); `multi` also writes `eval_multi/`: one glyph
  per image in the multi variant's sizes and aspects (what the probe's multi rows scored on).
  Each eval json holds `label`, the index of the letter in `classnames`.
and prints the commands that follow (`benchmarks/glyph_contrastive.sh OUT VARIANT` runs them all):

    python -m siglip2.data.tokenizer train --shards 'OUT/train/{000000..000023}.tar' --vocab 4000 --out OUT/tok
    python train.py data=webdataset 'data.train="OUT/train/{000000..000023}.tar"' data.batch_size=32 \
        data.num_workers=1 tokenizer=sentencepiece tokenizer.path=OUT/tok/tokenizer.model logger=csv \
        "eval.sets=[OUT/eval_single/eval_single.yaml]" trainer.max_steps=750 hydra.run.dir=OUT/run_750
    python eval.py ckpt_path=OUT/run_750/checkpoints/last.ckpt "eval.sets=[...]"  # train.py reports it too

The `.sh` reads 24 train shards: keep --num-train at 24000 (the default) when using it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from multiprocessing import Pool

import numpy as np
import yaml

ALPHABET = "AEHKMOSVXZ"
PREFIXES = ("", "a photo of ", "a picture of ", "an image of ")
TEMPLATES = ("a photo of a letter {c}.", "a letter {c}.", "a picture of a letter {c}.", "an image of a letter {c}.")
LAYOUTS = {  # (glyphs per image, sizes, max aspect)
    "single": ((1, 1), ("large",), 1.0),
    "multi": ((1, 3), ("medium", "large"), 2.0),
}
PER_SHARD = 1000


def caption(rng: np.random.Generator, glyphs, omit: float = 0.0) -> str:
    """'a photo of a large red letter K and a medium blue letter S' (glyphs left to right);
    `omit`: the chance, for each glyph and each of size and colour on its own, that the word is
    left out ('a photo of a letter K and a blue letter S'), so the letter must tell captions apart."""

    def phrase(g) -> str:
        words = [w for w in (g.size, g.color) if not (omit and rng.random() < omit)]
        return " ".join(["a", *words, "letter", g.glyph])

    parts = [phrase(g) for g in sorted(glyphs, key=lambda g: g.box[0])]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return PREFIXES[int(rng.integers(len(PREFIXES)))] + body


def write_shard(task: tuple) -> tuple[str, int]:
    """One shard from its own seed stream (seed, split id, shard): worker count is irrelevant."""
    from webdataset import TarWriter

    from siglip2.data.demo.glyphs import draw_glyph_scene, glyph_scene_size

    path, layout, sid, seed, shard, start, count, labelled, omit = task
    (lo, hi), sizes, aspect = LAYOUTS[layout]
    rng = np.random.default_rng([seed, sid, shard])
    with TarWriter(path, mtime=0) as tw:
        for i in range(start, start + count):
            w, h = glyph_scene_size(rng, max_aspect=aspect)
            force = ALPHABET[i % len(ALPHABET)] if labelled else None  # balanced classes
            n = 1 if labelled else int(rng.integers(lo, hi + 1))
            img, _, glyphs = draw_glyph_scene(
                rng, w, h, n, force, sizes, num_fonts=3, background="black", ink="pastel", alphabet=ALPHABET
            )
            meta = {
                "lang": "en",
                "width": w,
                "height": h,
                "regions": [
                    {
                        "caption": f"{g.size} {g.color} letter {g.glyph}",
                        "box": [
                            round(g.box[0] / w, 6),
                            round(g.box[1] / h, 6),
                            round(g.box[2] / w, 6),
                            round(g.box[3] / h, 6),
                        ],
                    }
                    for g in glyphs
                ],
            }
            if labelled:
                meta["label"] = ALPHABET.index(force)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90, subsampling=0)  # as the demo's shards
            tw.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": buf.getvalue(),
                    "txt": caption(rng, glyphs, omit).encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
    return path, count


def plan(
    out: str, layout: str, sid: int, seed: int, n: int, labelled: bool, omit: float = 0.0
) -> tuple[list[tuple], str]:
    os.makedirs(out, exist_ok=True)
    k = max(1, -(-n // PER_SHARD))
    tasks = [
        (
            os.path.join(out, f"{s:06d}.tar"),
            layout,
            sid,
            seed,
            s,
            s * PER_SHARD,
            min(PER_SHARD, n - s * PER_SHARD),
            labelled,
            omit,
        )
        for s in range(k)
    ]
    return tasks, f"{{000000..{k - 1:06d}}}.tar"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", choices=tuple(LAYOUTS), default="single")
    ap.add_argument("--num-train", type=int, default=24000, help="the default job's 750 steps x batch 32")
    ap.add_argument("--num-eval", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--omit",
        type=float,
        default=0.0,
        help="train captions: chance that each glyph's size, and its colour, is left out",
    )
    args = ap.parse_args()
    out = os.path.abspath(args.out)

    tasks, train_urls = plan(os.path.join(out, "train"), args.variant, 0, args.seed, args.num_train, False, args.omit)
    eval_layouts = ["single"] + (["multi"] if args.variant == "multi" else [])
    yamls = []
    for sid, layout in enumerate(eval_layouts, start=1):
        d = os.path.join(out, f"eval_{layout}")
        t, urls = plan(d, layout, sid, args.seed, args.num_eval, True)
        tasks += t
        spec = {
            "name": f"glyph_{layout}",
            "task": "zeroshot",
            "urls": urls,
            "num_samples": args.num_eval,
            "classnames": list(ALPHABET),
            "templates": list(TEMPLATES),
            "label_key": "label",
            "lang_key": "lang",
        }
        yamls.append(os.path.join(d, f"eval_{layout}.yaml"))
        with open(yamls[-1], "w") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
    with Pool(args.workers) as pool:
        written = sum(c for _, c in pool.imap_unordered(write_shard, tasks))
    print(f"wrote {written} samples ({args.variant}) under {out}")

    shards = os.path.join(out, "train", train_urls)
    sets = "[" + ",".join(yamls) + "]"
    print(f"TOKENIZER: python -m siglip2.data.tokenizer train --shards '{shards}' --vocab 4000 --out {out}/tok")
    print(
        f"TRAIN: python train.py data=webdataset 'data.train=\"{shards}\"' data.batch_size=32 data.num_workers=1 "
        f"tokenizer=sentencepiece tokenizer.path={out}/tok/tokenizer.model logger=csv 'eval.sets={sets}' "
        f"trainer.max_steps=750 hydra.run.dir={out}/run_750"
    )
    print(f"EVAL: python eval.py ckpt_path={out}/run_750/checkpoints/last.ckpt 'eval.sets={sets}'")
    print(f"SETS: {sets}")


if __name__ == "__main__":
    main()
