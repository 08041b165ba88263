"""The README's main job, exactly as a user runs it (`python train.py`), must learn.

The bars here are below what the default job reaches on a 2-core CPU in its time budget (see
the README "Results": 52% image->text and 67% text->image R@5 on the full held-out set, with
chance near 1%): the loss falls, and retrieval on held-out demo images is far above chance.
The issue's other bars (80% zero-shot shape accuracy, LocCa refexp/captions) are not met on
this budget; the README says so and shows why (benchmarks/demo_shape_probe.py).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_default_main_job_learns(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cache = Path(os.environ.get("SIGLIP2_TEST_CACHE", tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "train.py", f"paths.cache_dir={cache}", f"paths.log_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run_dir = next(tmp_path.glob("train/runs/*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [r for r in csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))) if r.get("train/loss")]
    first, last = float(rows[0]["train/loss"]), float(rows[-1]["train/loss"])
    assert last < 0.75 * first, (first, last)
    # 500 images x 3 captions: chance image->text R@5 is about 1%.
    assert metrics["retrieval/demo_retrieval/image_to_text_R@5"] > 0.35, metrics
    assert metrics["retrieval/demo_retrieval/text_to_image_R@5"] > 0.35, metrics
