"""The README's main job, exactly as a user runs it (`python train.py`), must learn.

The bars sit below the lower of two runs of the default job on the 2-core development
machine (docs/results.md, 2026-12-06: format 4, letter zero-shot top-1 31.2% of 10 classes,
image->text R@5 40.2%, text->image R@5 51.3%; format 5, the same train images with another
tokenizer, 40.9% / 44.0% / 52.1%; chance: 10% zero-shot, about 1% R@5), so a regression fails
CI; the two runs differ by 10 zero-shot points through the random stream alone. The issue's targets (80% zero-shot, 60% image->text
R@5, 40% refexp, 50% captions) are not met in this budget: docs/results.md says so and why.
Refexp accuracy (6.5%, at the constant-box baseline) and generated captions (0%: the decoder
writes "a photo of a letter s" for every image) are reported, without a bar.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_default_main_job_learns(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cache = Path(os.environ.get("SIGLIP2_TEST_CACHE", tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "train.py", f"paths.cache_dir={cache}", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    run_dir = next(tmp_path.glob("train/runs/*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [r for r in csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))) if r.get("train/loss")]
    first, last = float(rows[0]["train/loss"]), float(rows[-1]["train/loss"])
    assert last < 0.75 * first, (first, last)
    # 10 balanced letters: chance 10%
    assert metrics["zeroshot/demo_zeroshot/top1"] > 0.25, metrics
    # 500 images x 3 captions: chance image->text R@5 is about 1%.
    assert metrics["retrieval/demo_retrieval/image_to_text_R@5"] > 0.32, metrics
    assert metrics["retrieval/demo_retrieval/text_to_image_R@5"] > 0.42, metrics
    # reported, no bar: the tiny decoder does not learn these in its budget
    assert 0.0 <= metrics["refexp/demo_refexp/acc@0.5"] <= 1.0
    assert 0.0 <= metrics["zeroshot/demo_zeroshot/caption_names_object"] <= 1.0
