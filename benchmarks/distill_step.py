"""Cost of self-distillation: the pretraining step before and after the 80% switch.

    python benchmarks/distill_step.py            # tiny (demo) on CPU + B/16 FLOPs on the meta device
    python benchmarks/distill_step.py --quick    # fewer steps

Tiny, measured: median step time (forward, backward, AdamW) and peak RSS of a process that
runs only that phase, each phase in its own subprocess, the two alternating. B/16 (224 px,
batch 256 per device): training FLOPs per step of the vision passes (main image, teacher
global view, 8 local views of 6x6 tokens, the masked view) and the two heads, counted on the
meta device; the text tower and LocCa decoder are the same in both phases and are left out
of the ratio's numerator and denominator alike (reported apart).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_step as ts  # noqa: E402  (compose, build_ours, make_batch)


def worker(phase: str, steps: int, threads: int, local_grid: int | None = None) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # "none": a stage without the distillation losses (the cost of carrying them before 80%)
    grid = [f"stage.views.local_grid={local_grid}"] if local_grid else []
    cfg = ts.compose("tiny", ["~stage.losses.local_to_global", "~stage.losses.masked"] if phase == "none" else grid)
    stage, _, step = ts.build_ours(cfg)
    batch = ts.make_batch(cfg, int(cfg.data.batch_size), locca=True)
    batch["image"] = batch["image"].clamp(-1, 1)
    if phase == "after":
        for name in ("local_to_global", "masked"):
            stage.enable_loss(name)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step(batch)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "phase": phase,
        "step_ms": 1000 * statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch": int(batch["image"].shape[0]),
    }


def b16_flops(batch: int = 256) -> dict:
    from lightning.fabric.utilities.throughput import measure_flops

    from siglip2.model import build_model

    cfg = ts.compose("b16", [])
    m = cfg.model
    with torch.device("meta"):
        model = build_model({**dict(m), "text": {**dict(m.text)}, "vision": {**dict(m.vision), "image_size": 224}})
        from siglip2.losses.distill import DINOHead

        l2g = DINOHead(768, 65536)
        masked = DINOHead(768, 8192)
        image = torch.empty(batch, 3, 224, 224)
        local = torch.empty(8 * batch, 3, 96, 96)
        text = torch.zeros(batch, 64, dtype=torch.long)
    n_mask = 98  # 50% of 14 x 14

    def main_pass():
        return model.encode_image(image=image).pooled.sum()

    def text_pass():
        return model.encode_text(text).sum()

    def distill():
        out = model.encode_image(image=local).pooled
        masked_tokens = model.encode_image(image=image).tokens[:, :n_mask]
        return l2g(out).sum() + masked(masked_tokens.reshape(-1, 768)).sum()

    def teacher():  # counted forward only (no loss_fn below): the teacher takes no gradient
        t = model.encode_image(image=image)
        return l2g(t.pooled).sum() + masked(t.tokens[:, :n_mask].reshape(-1, 768)).sum()

    with torch.device("meta"):
        f_main = measure_flops(model, main_pass, loss_fn=lambda y: y)
        f_text = measure_flops(model, text_pass, loss_fn=lambda y: y)
        f_distill = measure_flops(model, distill, loss_fn=lambda y: y)
        f_teacher = measure_flops(model, teacher)
    return {
        "b16_vision_main_tflops": f_main / 1e12,
        "b16_text_tflops": f_text / 1e12,
        "b16_distill_student_tflops": f_distill / 1e12,
        "b16_teacher_tflops": f_teacher / 1e12,
        "b16_vision_ratio_after_vs_before": (f_main + f_distill + f_teacher) / f_main,
        "b16_towers_ratio_after_vs_before": (f_main + f_text + f_distill + f_teacher) / (f_main + f_text),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--local-grid",
        type=int,
        default=None,
        help="local views of N x N tokens (default: the model yaml's distill.local_grid)",
    )
    ap.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], 3 if args.quick else args.steps, args.threads, args.local_grid)))
        return
    rows = {"none": [], "before": [], "after": []}
    for _ in range(1 if args.quick else args.repeats):
        for phase in ("none", "before", "after"):  # alternate, each in a fresh process (peak RSS per phase)
            cmd = [sys.executable, __file__, "--worker", phase, "--threads", str(args.threads)]
            if args.local_grid:
                cmd += ["--local-grid", str(args.local_grid)]
            if args.quick:
                cmd.append("--quick")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[phase].append(json.loads(out.strip().splitlines()[-1]))
    none = {k: statistics.median(r[k] for r in rows["none"]) for k in ("step_ms", "peak_rss_mb")}
    before = {k: statistics.median(r[k] for r in rows["before"]) for k in ("step_ms", "peak_rss_mb")}
    after = {k: statistics.median(r[k] for r in rows["after"]) for k in ("step_ms", "peak_rss_mb")}
    print(f"tiny, batch {rows['before'][0]['batch']}, {args.threads} threads, CPU fp32")
    print(
        f"  without distillation losses {none['step_ms']:.0f} ms, {none['peak_rss_mb']:.0f} MB; with them, "
        f"before the switch: {before['step_ms'] / none['step_ms']:.2f}x time, "
        f"{before['peak_rss_mb'] / none['peak_rss_mb']:.2f}x memory"
    )
    print(
        f"  step time  before {before['step_ms']:.0f} ms   after {after['step_ms']:.0f} ms   "
        f"ratio {after['step_ms'] / before['step_ms']:.2f}x"
    )
    print(
        f"  peak RSS   before {before['peak_rss_mb']:.0f} MB   after {after['peak_rss_mb']:.0f} MB   "
        f"ratio {after['peak_rss_mb'] / before['peak_rss_mb']:.2f}x"
    )
    f = b16_flops()
    print("B/16 224 px, batch 256, training FLOPs per step (meta device):")
    print(
        f"  vision main {f['b16_vision_main_tflops']:.1f} T, text {f['b16_text_tflops']:.1f} T, distillation "
        f"student passes + heads {f['b16_distill_student_tflops']:.1f} T, teacher {f['b16_teacher_tflops']:.1f} T"
    )
    print(
        f"  vision ratio after/before {f['b16_vision_ratio_after_vs_before']:.2f}x, towers ratio "
        f"{f['b16_towers_ratio_after_vs_before']:.2f}x"
    )


if __name__ == "__main__":
    main()
