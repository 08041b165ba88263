"""The table of `benchmarks/miniatures.sh OUT`: each stage's pair side by side, from the runs'
metrics.json (train.py and eval.py write it) and, for ACID, the shares of noisy and clean
captions it chose (the CSV log's `acid/chosen_frac_*`, mean over steps).

    python benchmarks/miniatures_table.py OUT     # markdown on stdout; runs not there print "-"
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ZS, TOP5 = "zeroshot/demo_zeroshot/top1", "zeroshot/demo_zeroshot/top5"
I2T, T2I = "retrieval/demo_retrieval/image_to_text_R@5", "retrieval/demo_retrieval/text_to_image_R@5"
REF, MIOU = "refexp/demo_refexp/acc@0.5", "segmentation/demo_segmentation/miou"
CAP = "zeroshot/demo_zeroshot/caption_names_object"


def metrics(out: Path, run: str) -> dict[str, float]:
    path = out / run / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def pct(m: dict[str, float], key: str) -> str:
    return f"{100 * m[key]:.1f}" if key in m else "-"


def csv_mean(out: Path, run: str, column: str) -> str:
    values = []
    for path in (out / run).glob("csv/*/metrics.csv"):
        with path.open() as f:
            values += [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
    return f"{sum(values) / len(values):.2f}" if values else "-"


def rows(out: Path, runs: list[tuple[str, str]], keys: list[str]) -> list[str]:
    return [f"| {label} | " + " | ".join(pct(metrics(out, run), k) for k in keys) + " |" for run, label in runs]


def table(out: Path) -> str:
    lines = [
        "LocCa on/off (whole held-out sets, %; refexp: acc@0.5)",
        "",
        "| run | zero-shot top-1 | top-5 | I->T R@5 | T->I R@5 | refexp | captions |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += rows(
        out,
        [("base", "default job (LocCa on)"), ("no_locca", "stage.losses.locca=null")],
        [ZS, TOP5, I2T, T2I, REF, CAP],
    )
    base_line = out / "refexp_baseline.txt"
    if base_line.exists():
        lines += ["", "Constant-box refexp baseline:", "", "```", base_line.read_text().strip(), "```"]
    lines += [
        "",
        "Self-distillation + masked prediction on/off (dense-probe mIoU, %)",
        "",
        "| run | at 95% | final | zero-shot top-1 | I->T R@5 |",
        "|---|---|---|---|---|",
    ]
    for run, at95, label in (
        ("base", "base_95", "default job (on from 80%)"),
        ("no_distill", "no_distill_95", "without the two losses"),
    ):
        m, m95 = metrics(out, run), metrics(out, at95)
        lines.append(f"| {label} | {pct(m95, MIOU)} | {pct(m, MIOU)} | {pct(m, ZS)} | {pct(m, I2T)} |")
    lines += [
        "",
        "Resolution adaptation: the 95% checkpoint to the end (whole held-out sets at the run's resolution, %)",
        "",
        "| last 5% at | zero-shot top-1 | top-5 | I->T R@5 | T->I R@5 | refexp | dense mIoU |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += rows(out, [("resadapt_64", "64 px"), ("resadapt_96", "96 px")], [ZS, TOP5, I2T, T2I, REF, MIOU])
    lines += [
        "",
        "NaFlex vs the fixed continuation (elongated images, eval.aspect_min=1.6; zero-shot top-1 / I->T R@5 / T->I R@5, %)",
        "",
        "| continuation | 32 tokens | 64 tokens | 144 tokens | square 64 px |",
        "|---|---|---|---|---|",
    ]
    for run in ("fixed", "naflex"):
        cells = []
        for suffix in ("32", "64", "144", "square"):
            m = metrics(out, f"{run}_{suffix}")
            cells.append(" / ".join(pct(m, k) for k in (ZS, I2T, T2I)) if m else "")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ACID on 30% noisy captions (data.caption_noise=0.3), teacher = the default job on clean captions (%)",
        "",
        "| run | zero-shot top-1 | I->T R@5 | T->I R@5 | chosen share of noisy / clean |",
        "|---|---|---|---|---|",
    ]
    for run, label in (
        ("base", "teacher (clean captions)"),
        ("noisy", "student (noisy captions)"),
        ("acid", "ACID, 300 steps"),
        ("random", "random subsampling"),
        ("plain", "plain continued"),
    ):
        m = metrics(out, run)
        share = f"{csv_mean(out, run, 'acid/chosen_frac_noisy')} / {csv_mean(out, run, 'acid/chosen_frac_clean')}"
        lines.append(f"| {label} | {pct(m, ZS)} | {pct(m, I2T)} | {pct(m, T2I)} | {share} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
