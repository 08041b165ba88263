"""Nothing lost, no silent wrong numbers (issue 18): preemption, exports, tokenizers.

Each test is a case a new user hit: it failed on the code before the fix and passes after.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _start(args: list[str], cache: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "train.py", *args, f"paths.cache_dir={cache}", f"hydra.run.dir={out}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(cache_dir, tmp_path):
    """SIGTERM (preemption, a scheduler's time limit) used to exit with code 0 and save
    nothing since the last periodic checkpoint. Now: last.ckpt at the step the signal
    stopped, exit code 143, and `ckpt_path=last.ckpt` resumes from that step."""
    out = tmp_path / "run"
    proc = _start(["debug=fast", "trainer.max_steps=400", "data.batches_per_epoch=400"], cache_dir, out)
    periodic = out / "checkpoints" / "step_0000003.ckpt"
    deadline = time.time() + 300
    while not periodic.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert periodic.exists(), proc.communicate()[0][-3000:]
    time.sleep(2.0)  # a few steps past the periodic checkpoint
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, log[-3000:]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stopped = int(last["global_step"])
    assert 3 < stopped < 400, stopped  # later than the periodic checkpoint: nothing lost
    assert last["siglip2"]["examples_seen"] == stopped * 16
    # resume continues from there, to the end
    resumed = _start(["debug=fast", "trainer.max_steps=" + str(stopped + 2), "data.batches_per_epoch=400",
                      f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"], cache_dir, tmp_path / "resumed")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(final["global_step"]) == stopped + 2
