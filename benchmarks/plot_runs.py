"""Plot the training losses of one or more runs against samples seen, from their csv logs.

    python benchmarks/plot_runs.py RUN_DIR[:LABEL] ... --out docs/demo_loss_curve.png

RUN_DIR is a run folder (`logs/train/runs/<time>`) with `csv/version_*/metrics.csv`
(`logger=csv`, or the default logger plus `callbacks` writing csv). Plots `train/loss_sigmoid`
and `train/loss_locca` (left, right) against `train/samples`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read(run: Path) -> dict[str, list[tuple[float, float]]]:
    path = next(run.glob("csv/version_*/metrics.csv"), None)
    if path is None:
        raise SystemExit(f"{run}: no csv/version_*/metrics.csv")
    rows = list(csv.DictReader(open(path)))
    step_samples = {r["step"]: float(r["train/samples"]) for r in rows if r.get("train/samples")}
    out: dict[str, list[tuple[float, float]]] = {"train/loss_sigmoid": [], "train/loss_locca": []}
    for r in rows:
        for key in out:
            if r.get(key) and r["step"] in step_samples:
                out[key].append((step_samples[r["step"]], float(r[key])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="RUN_DIR[:LABEL]")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for spec in args.runs:
        run, _, label = spec.partition(":")
        series = read(Path(run))
        for ax, (_key, points) in zip(axes, series.items()):
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label or run)
    for ax, title in zip(axes, ("sigmoid loss", "LocCa loss (Cap + ARef + GCap)")):
        ax.set_title(title)
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
