"""Model FLOPs utilisation of our pretrain step on this machine.

MFU = (model FLOPs per step) / (measured step time) / (this machine's fp32 matmul rate).

- FLOPs per step: `Stage.measure_flops(batch)`, i.e. Lightning's `measure_flops` on the meta
  device, forward + backward of both towers plus, with LocCa, one decoder pass with the
  vocabulary projection per task at full length (the count the ThroughputMonitor logs).
- Step time: the real step of `benchmarks/train_step.py` (PretrainStage from the composed
  config, training_step, backward, clipping, AdamW), random inputs, fp32.
- Matmul rate: `torch.matmul` of two N x N fp32 matrices (2 N^3 FLOPs) with the same thread
  count, measured in the same process, alternating with the steps so that machine load hits
  both alike; median of --repeats each.

    python benchmarks/mfu.py            # tiny and B/16-shaped (batch 8, 112 px), sigmoid and sigmoid + LocCa
    python benchmarks/mfu.py --quick    # tiny only, batch 32 (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import train_step as ts  # noqa: E402  (shares the builders, sizes and inputs)


def matmul_rate(n: int, reps: int = 3) -> float:
    """FLOP/s of one n x n @ n x n fp32 matmul (best of `reps`, after a warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def worker(args) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    size, variant = args.worker
    overrides = [] if variant == "locca" else ["~stage.losses.locca"]
    cfg = ts.compose(size, overrides)
    stage, _, step = ts.build_ours(cfg)
    flops = stage.measure_flops(args.batch)
    batch = ts.make_batch(cfg, args.batch, variant == "locca")
    for _ in range(args.warmup):
        step(batch)
    steps, rates = [], []
    for _ in range(args.repeats):
        rates.append(matmul_rate(args.matmul))
        start = time.perf_counter()
        step(batch)
        steps.append(time.perf_counter() - start)
    step_s, rate = statistics.median(steps), statistics.median(rates)
    return {
        "size": size,
        "variant": variant,
        "batch": args.batch,
        "image": int(cfg.model.vision.image_size),
        "threads": torch.get_num_threads(),
        "flops": flops,
        "step_s": step_s,
        "matmul_flops": rate,
        "mfu": flops / step_s / rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", nargs="+", choices=sorted(ts.SIZES), default=None)
    ap.add_argument("--variants", nargs="+", choices=ts.VARIANTS, default=list(ts.VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the steps and the matmul")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--matmul", type=int, default=2048, help="side of the square matmul")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "b16"])
    print(
        f"MFU, fp32 CPU, {args.threads} thread(s), torch {torch.__version__}; matmul {args.matmul}^2; "
        f"median of {args.repeats} steps and matmuls, alternated"
    )
    print(
        f"{'size':>5} {'variant':>8} {'batch':>5} {'px':>4} {'GFLOP/step':>10} {'step s':>7} {'GFLOP/s':>8} "
        f"{'matmul GFLOP/s':>14} {'MFU':>6}"
    )
    for size in sizes:
        for variant in args.variants:
            batch, warmup = ts.row_settings(args, size)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                size,
                variant,
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
                "--warmup",
                str(warmup),
                "--batch",
                str(batch),
                "--matmul",
                str(args.matmul),
            ]
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"},
            )
            if out.returncode:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"row {size}/{variant} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{size:>5} {variant:>8} {r['batch']:>5} {r['image']:>4} {r['flops'] / 1e9:>10.1f} "
                f"{r['step_s']:>7.3f} {r['flops'] / r['step_s'] / 1e9:>8.1f} {r['matmul_flops'] / 1e9:>14.1f} "
                f"{r['mfu']:>6.1%}"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
