"""The training entry point as a user runs it: train.py runs, sweeps and DDP on 2 CPU processes
(resume, init_from, losses that join later and the strategies' configs, in process:
tests/integration/test_train.py).

These are end-to-end (marked `e2e`): each builds a tiny demo once (shared cache) and trains
a tiny model for a few steps on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, cli

pytestmark = pytest.mark.e2e


def test_debug_fast_cli_writes_metrics_and_handoff_checkpoints(cache_dir, tmp_path):
    proc = cli(["debug=fast"], cache_dir, tmp_path)
    metrics_path = Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1])
    metrics = json.loads(metrics_path.read_text())
    assert metrics["global_step"] == 6
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpts = {p.name for p in (metrics_path.parent / "checkpoints").iterdir()}
    assert {"last.ckpt", "frac_0.90.ckpt", "frac_0.95.ckpt"} <= ckpts
    assert not any(name.endswith(".tmp") for name in ckpts)


def test_multirun_sweep_writes_one_output_dir_per_run(cache_dir, tmp_path):
    """The README's sweep as a user types it: no paths.log_dir, so logs/ goes under the
    directory it is started from (it once failed resolving hydra.sweep.dir: "HydraConfig was
    not set")."""
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    env.update(WANDB_MODE="disabled", SIGLIP2_CACHE=str(cache_dir))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "optim.lr=1e-3,3e-4", "debug=fast", "trainer.max_steps=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = sorted(tmp_path.glob("logs/debug/multiruns/*/*/metrics.json"))
    assert len(found) == 2
    import yaml

    lrs = {yaml.safe_load((p.parent / ".hydra" / "config.yaml").read_text())["optim"]["lr"] for p in found}
    assert lrs == {1e-3, 3e-4}


def test_multirun_sweep_with_ddp_runs_each_job_on_its_own_ranks(cache_dir, tmp_path):
    """Lightning re-runs argv for rank 1; in a sweep that must be this job, not the sweep.

    The jobs differ in model shape, so a rank 1 running another job's overrides cannot join
    the parent's DDP group silently: the run fails or hangs (caught by the timeout).
    """
    cli(
        ["-m", "model.vision.depth=1,2", "debug=fast", "trainer=ddp_cpu", "trainer.max_steps=2"],
        cache_dir,
        tmp_path,
        timeout=300,
    )
    jobs = sorted(p.parent for p in tmp_path.glob("debug/multiruns/*/*/metrics.json"))
    assert len(jobs) == 2
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 2
        assert (job / "train_ddp_process_1.log").exists()  # rank 1 ran inside this job's dir
    assert not (tmp_path / "debug" / "runs").exists()


def test_ddp_cpu_two_processes_train_with_a_loss_that_joins_later(cache_dir, tmp_path):
    """DDP's reducer expects a gradient for every parameter it wraps at step 0: the probe
    loss's head exists from step 0, is in the graph with weight 0 until its switch at 50%,
    then trains. Losses and gradients against one process: tests/e2e/test_ddp_parity.py."""
    proc = cli(
        [
            "debug=fast",
            "trainer=ddp_cpu",
            "trainer.max_steps=4",
            "stage._target_=probe_stage.ProbeStage",
            "+stage.losses.probe.start_frac=0.5",
        ],
        cache_dir,
        tmp_path,
    )
    metrics_path = Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1])
    metrics = json.loads(metrics_path.read_text())
    assert metrics["global_step"] == 4
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["schedule/probe_on"] == 1.0 and torch.isfinite(torch.tensor(metrics["train/loss_probe"]))
    # the final state, both ranks' batches counted (was the last *logged* value, one batch behind)
    assert metrics["train/examples_seen"] == 4 * 2 * 16 and metrics["train/progress"] == 1.0


def test_ddp_with_one_process_trains_through_the_switch(cache_dir, tmp_path):
    """`trainer=gpu_ddp trainer.devices=1` (a one-GPU job with the multi-GPU config): DDP still
    runs its reducer, which needs a gradient for the dormant distillation heads."""
    proc = cli(["debug=fast", "trainer=ddp_cpu", "trainer.devices=1"], cache_dir, tmp_path)
    metrics = json.loads(Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1]).read_text())
    assert metrics["global_step"] == 6 and metrics["schedule/local_to_global_on"] == 1.0
