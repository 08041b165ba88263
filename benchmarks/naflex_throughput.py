"""NaFlex throughput: its loader per worker and its step vs the fixed-resolution ones.

1. Loader, one worker each, samples/s from the first batch on: the training loader exactly as
   a run builds it (`stages.data.ImageTextData` from the composed config, LocCa targets
   included) with `stage=naflex` (native-aspect resize to the batch's planned length,
   patchify, pad; the tiny model's lengths {32, 64, 144, 196, 256}) vs `stage=pretrain`
   (square 64 px). Also the patch tokens per second each delivers.
2. Step (forward, backward, AdamW) of the tiny model at the same token count: NaFlex batches
   at length 64 (`stage.naflex.seq_lens=[64]`: 64 patches, padded, with per-grid position
   tables) vs the fixed 64 px step (8x8 = 64 tokens), both sigmoid + LocCa, batch 32, on real
   batches from the two loaders; alternated, median of the timed steps.

    python benchmarks/naflex_throughput.py [--quick] [--root DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import data_pipeline as dp  # noqa: E402
import train_step as ts  # noqa: E402

NAFLEX = ["stage=naflex"]
FIXED = ["~stage.losses.local_to_global", "~stage.losses.masked"]


def loader_rate(demo, extra, batch: int, batches: int) -> tuple[float, float]:
    data = dp.build_data(demo, 64, batch, batches, workers=1, extra=extra)
    samples = tokens = 0
    it = iter(data.train_dataloader())
    next(it)
    start = time.perf_counter()
    for b in it:
        samples += len(b["key"])
        tokens += int(b["patch_valid"].sum()) if "patch_valid" in b else len(b["key"]) * 64
    dt = time.perf_counter() - start
    return samples / dt, tokens / dt


def step_times(demo, extra, steps: int) -> list[float]:
    data = dp.build_data(demo, 64, 32, 2, workers=0, extra=extra)
    batch = next(iter(data.train_dataloader()))
    cfg = ts.compose("tiny", [*extra, "data.batch_size=32"])
    torch.manual_seed(0)
    _, _, step = ts.build_ours(cfg)
    for _ in range(2):
        step(batch)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--root", default=dp.DEFAULT_ROOT)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=None, help="eval-set size of a demo built here (tests)")
    ap.add_argument("--batches", type=int, default=None, help="loader batches per pass (default 30, quick 8)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    from siglip2.data.demo import ensure_demo

    sizes = (
        {}
        if args.eval_size is None
        else {f"num_{k}": args.eval_size for k in ("zeroshot", "retrieval", "refexp", "segmentation")}
    )
    demo = ensure_demo(args.root, num_train=args.num_train, **sizes)
    batches = args.batches or (8 if args.quick else 30)
    rates = {"naflex": [], "fixed": []}
    for r in range(1 if args.quick else args.repeats):
        for name, extra in (
            (("naflex", NAFLEX), ("fixed", FIXED)) if r % 2 == 0 else (("fixed", FIXED), ("naflex", NAFLEX))
        ):
            rates[name].append(loader_rate(demo, extra, 32, batches))
    med = {
        k: (statistics.median(v[0] for v in rows), statistics.median(v[1] for v in rows)) for k, rows in rates.items()
    }
    print("loader, 1 worker, batch 32 (samples/s, patch tokens/s):")
    for k, (s, t) in med.items():
        print(f"  {k:6s} {s:7.1f} samples/s  {t:9.0f} tokens/s")
    print(f"  naflex / fixed: {med['naflex'][0] / med['fixed'][0]:.2f}x samples/s")
    n = 3 if args.quick else 8
    times = {"naflex": [], "fixed": []}
    for _ in range(1 if args.quick else args.repeats):
        for name, extra in (("naflex", [*NAFLEX, "stage.naflex.seq_lens=[64]"]), ("fixed", FIXED)):
            times[name] += step_times(demo, extra, n)
    step = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print("tiny step at 64 tokens, batch 32, sigmoid + LocCa, 2 threads (median ms):")
    print(
        f"  naflex {step['naflex']:.0f} ms   fixed {step['fixed']:.0f} ms   ratio {step['naflex'] / step['fixed']:.2f}x"
    )


if __name__ == "__main__":
    main()
