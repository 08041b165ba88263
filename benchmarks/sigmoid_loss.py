"""Sigmoid loss: forward + backward time and peak memory, ours vs the full-matrix reference vs
open_clip's SigLipLoss, at per-device batch sizes 1k..16k (issue: loss at b = 16k must use at
most 1/8 of the reference's peak memory at no more than 1.1x its time).

Each (implementation, batch) runs in its own subprocess so that peak resident memory
(ru_maxrss, minus the process's baseline after the inputs exist) belongs to that
implementation alone. Times: median of --repeats runs after one warm-up, alternated.

    python benchmarks/sigmoid_loss.py            # b = 1k, 2k, 4k, 8k, 16k
    python benchmarks/sigmoid_loss.py --quick    # b = 1k, 4k
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

IMPLS = ("reference", "ours", "open_clip")


def worker(impl: str, b: int, dim: int, repeats: int, chunk: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = F.normalize(torch.randn(b, dim), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(b, dim), dim=-1).requires_grad_()
    t = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    if impl == "reference":

        def loss_fn():
            logits = t * x @ y.T + bias
            labels = 2 * torch.eye(b) - 1
            return -F.logsigmoid(labels * logits).sum() / b
    elif impl == "ours":
        from siglip2.losses.sigmoid import SigmoidLoss

        module = SigmoidLoss(chunk_size=chunk)
        loss_fn = lambda: module(x, y, t, bias)[0]  # noqa: E731
    else:
        from open_clip.loss import SigLipLoss

        module = SigLipLoss()
        loss_fn = lambda: module(x, y, t, bias)  # noqa: E731
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        x.grad = y.grad = t.grad = bias.grad = None
        if i:
            times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "impl": impl,
        "b": b,
        "time_s": statistics.median(times),
        "peak_mb": (peak_kb - base_kb) / 1024,
        "loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.dim, args.repeats, args.chunk)))
        return
    sizes = (1024, 4096) if args.quick else (1024, 2048, 4096, 8192, 16384)
    print(f"sigmoid loss fwd+bwd, D={args.dim}, chunk={args.chunk}, median of {args.repeats} after warm-up")
    print(f"{'b':>6} {'impl':>10} {'time s':>8} {'peak MB':>9} {'time/ref':>9} {'mem/ref':>8} {'loss':>10}")
    for b in sizes:
        rows = {}
        for impl in IMPLS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    impl,
                    str(b),
                    "--dim",
                    str(args.dim),
                    "--repeats",
                    str(args.repeats),
                    "--chunk",
                    str(args.chunk),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        ref = rows["reference"]
        for impl in IMPLS:
            r = rows[impl]
            print(
                f"{b:>6} {impl:>10} {r['time_s']:>8.3f} {r['peak_mb']:>9.1f} {r['time_s'] / ref['time_s']:>9.2f} "
                f"{r['peak_mb'] / max(ref['peak_mb'], 1e-9):>8.3f} {r['loss']:>10.4f}"
            )


if __name__ == "__main__":
    main()
