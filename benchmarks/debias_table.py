"""The de-biasing miniature's table (benchmarks/debias_miniature.sh): the biased and the
balanced run side by side, from their metrics.json, with the balance table's summary.

    python benchmarks/debias_table.py OUT [--clean RUN_DIR]

`--clean`: a run (or eval.py output) of a model trained on the unbiased demo, as a third row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [
    ("representation bias (max |share - 1/2|)", "representation_bias/demo_bias_neutral/bias"),
    ('share "red" on neutral glyphs', "representation_bias/demo_bias_neutral/share/red"),
    ("association bias (mean max-min P_colour(letter))", "association_bias/demo_bias_attributed/bias"),
    ("zero-shot top-1", "zeroshot/demo_zeroshot/top1"),
    ("10-shot linear probe top-1", "fewshot/demo_fewshot/10shot_top1"),
    ("I->T R@5", "retrieval/demo_retrieval/image_to_text_R@5"),
    ("T->I R@5", "retrieval/demo_retrieval/text_to_image_R@5"),
    ("train samples dropped by the table (per rank)", "data/filtered_balance"),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--clean", type=Path, default=None)
    args = p.parse_args()
    runs = [("biased", args.out / "biased"), ("balanced", args.out / "balanced")]
    if args.clean:
        runs.insert(0, ("clean demo", args.clean))
    m = {
        name: json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else {} for name, d in runs
    }
    print("| metric | " + " | ".join(n for n, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for label, key in ROWS:
        cells = []
        for name, _ in runs:
            v = m[name].get(key)
            cells.append("-" if v is None else (f"{v:.0f}" if key.startswith("data/") else f"{100 * v:.1f}"))
        print(f"| {label} | " + " | ".join(cells) + " |")
    summary = args.out / "keep.tsv.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        b, a = s["before"], s["after"]
        print(
            f"\nbalance table: kept {s['kept']} of {s['examples']} ({100 * s['kept_fraction']:.1f}%; LP bound "
            f"{100 * (s['max_keep_bound'] or 0):.1f}%); red share {b['share'].get('red', 0):.3f} -> "
            f"{a['share'].get('red', 0):.3f}; max association gap {b['max_association_gap']:.3f} -> "
            f"{a['max_association_gap']:.3f}"
        )


if __name__ == "__main__":
    main()
