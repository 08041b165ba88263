"""The command line: ``python -m siglip2.data.demo --out DIR [--num-train N] [--grid PNG]``."""

from __future__ import annotations

import argparse
import time
from typing import Iterable

from .build import ensure_demo as _ensure
from .view import render_grid as _render


def main(argv: Iterable[str] | None = None) -> int:
    from siglip2.data import demo as _demo  # --help: the package docstring's first line

    p = argparse.ArgumentParser(prog="python -m siglip2.data.demo", description=_demo.__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="root folder of the demo data")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--grid", default=None, help="also render 16 train samples to this PNG")
    a = p.parse_args(list(argv) if argv is not None else None)

    t0 = time.perf_counter()
    d = _ensure(a.out, num_train=a.num_train, seed=a.seed, workers=a.workers)
    dt = time.perf_counter() - t0
    print(f"{'built' if d.built else 'reused'} demo data in {dt:.1f}s at {d.root}")
    for k in (
        "train_urls",
        "zeroshot_yaml",
        "retrieval_yaml",
        "refexp_yaml",
        "segmentation_yaml",
        "words_yaml",
        "words_square_yaml",
        "tokenizer_path",
    ):
        print(f"  {k}: {getattr(d, k)}")
    if a.grid:
        print("  grid:", _render(d.train_urls, a.grid))
    return 0
