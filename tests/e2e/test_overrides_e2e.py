"""train.py as a user runs it stops before Hydra with the named key (issue 27 item 5; the
checks themselves: tests/unit/test_overrides.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_py_stops_before_hydra_with_the_named_key():
    proc = subprocess.run(
        [sys.executable, "train.py", "data.batch_szie=32", "optim.lr=abc"],
        cwd=ROOT,
        env=dict(os.environ, WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "train.py: error: unknown key 'data.batch_szie' (did you mean 'data.batch_size'?)",
        "train.py: error: optim.lr=abc: expected a number (its default is 0.00035)",
    ]
