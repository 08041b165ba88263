"""Cost of ACID's scoring: the training step with curation vs plain continued training.

    python benchmarks/acid_step.py            # tiny student + the demo teacher's size, CPU; B/16 + So400m FLOPs
    python benchmarks/acid_step.py --quick    # fewer steps

Tiny, measured in one process, the variants alternating: median time of
- `plain`: one training step at batch b (forward, backward, AdamW), what `filter_ratio=0` runs;
- `acid`:  the ACID step: the learner (no gradient) and the frozen teacher score the
  super-batch of b / (1 - f), JEST joint selection, then the same training step on the b chosen;
- `score`: the scoring and selection alone (the part of `acid` that trains nothing).
Throughput counts trained examples only, so `acid / plain` is the slowdown a user sees.

B/16 student (256 px) with an So400m/14 teacher (384 px = 27x27 patches, 378 here; batch 256 trained per device,
f = 0.5): FLOPs per step counted on the meta device, training (forward + backward) of b
vs that plus forward passes of both models over 2b.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_step as ts  # noqa: E402  (compose, build_ours, make_batch)

TEACHER = dict(width=192, depth=6, mlp_dim=768, heads=4)  # the demo teacher's size (docs/results.md)


def tiny(steps: int, batch: int, filter_ratio: float, threads: int) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from siglip2.model import build_model

    cfg = ts.compose(
        "tiny", ["stage=acid", "stage.acid.method=random", f"data.batch_size={batch}", "stage.acid.n_chunks=16"]
    )
    stage, _, step = ts.build_ours(cfg)
    m = cfg.model
    teacher = build_model(
        {
            "name": "teacher",
            "embed_dim": 192,
            "vision": {**dict(m.vision), **TEACHER},
            "text": {**dict(m.text), **TEACHER, "vocab_size": int(m.text.vocab_size)},
        }
    ).eval()
    teacher.requires_grad_(False)
    stage.__dict__["teacher_model"] = teacher
    stage.acid.method = "joint"
    super_batch = round(batch / (1 - filter_ratio))
    big = ts.make_batch(cfg, super_batch, locca=False)
    big["image"] = big["image"].clamp(-1, 1)
    small = {k: v[:batch] for k, v in big.items()}
    times = {"plain": [], "acid": [], "score": []}
    for i in range(steps + 2):
        for name in ("plain", "acid", "score"):
            t0 = time.perf_counter()
            if name == "plain":
                stage.trained_batch_size = batch
                step(dict(small))
            elif name == "acid":
                stage.trained_batch_size = batch
                step(dict(big))
            else:
                stage.choose(big, batch)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()} | {"batch": batch, "super_batch": super_batch}


def b16_flops(batch: int = 256, filter_ratio: float = 0.5) -> dict:
    from lightning.fabric.utilities.throughput import measure_flops

    from siglip2.model import build_model

    from omegaconf import OmegaConf

    def model_of(size: str, image: int):
        m = OmegaConf.to_container(OmegaConf.load(ts.ROOT / "conf" / "model" / f"{size}.yaml"), resolve=True)
        m["vision"].update(image_size=image, posemb_grid=image // int(m["vision"]["patch_size"]))
        return build_model(m), m

    super_batch = round(batch / (1 - filter_ratio))
    with torch.device("meta"):
        student, s_cfg = model_of("b16", 256)
        teacher, t_cfg = model_of("so400m14", 378)  # 27x27 patches, as the released /14@384 models

    def flops(model, cfg, n, image, train):
        with torch.device("meta"):
            x = torch.empty(n, 3, image, image)
            t = torch.zeros(n, int(cfg["text"]["max_len"]), dtype=torch.long)

        def fwd():
            return model.encode_image(image=x).pooled.sum() + model.encode_text(t).sum()

        return measure_flops(model, fwd, loss_fn=(lambda y: y) if train else None)

    train = flops(student, s_cfg, batch, 256, True)
    learner_score = flops(student, s_cfg, super_batch, 256, False)
    teacher_score = flops(teacher, t_cfg, super_batch, 378, False)
    return {"train": train, "learner_score": learner_score, "teacher_score": teacher_score}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--filter-ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-b16", action="store_true", help="skip the B/16 + So400m FLOPs count")
    args = ap.parse_args()
    steps = 2 if args.quick else args.steps
    batch = 8 if args.quick else args.batch
    r = tiny(steps, batch, args.filter_ratio, args.threads)
    print(
        f"tiny student, demo-size teacher ({TEACHER['width']} wide, {TEACHER['depth']} deep), b={r['batch']} of "
        f"{r['super_batch']}, {args.threads} threads, median of {steps} steps:"
    )
    print(
        f"  plain {r['plain']:.0f} ms   acid {r['acid']:.0f} ms   (scoring + selection {r['score']:.0f} ms)   "
        f"acid / plain: {r['acid'] / r['plain']:.2f}x time per trained example"
    )
    if not (args.quick or args.no_b16):
        f = b16_flops(filter_ratio=args.filter_ratio)
        total = f["train"] + f["learner_score"] + f["teacher_score"]
        print(
            "B/16@256 student, So400m/14@384 teacher, 256 trained per device, f=%.2f (TFLOPs per step):"
            % args.filter_ratio
        )
        print(
            f"  train {f['train'] / 1e12:.1f}  learner scoring {f['learner_score'] / 1e12:.1f}  "
            f"teacher scoring {f['teacher_score'] / 1e12:.1f}  acid / plain: {total / f['train']:.2f}x  "
            f"(with cached teacher embeddings: {(f['train'] + f['learner_score']) / f['train']:.2f}x)"
        )


if __name__ == "__main__":
    main()
