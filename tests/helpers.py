"""What many test modules share: the repository root, `train.py` as a user runs it (`cli`),
a composed debug config (`compose_cfg`), an in-process fit (`fit`) and a checkpoint's weights
(`weights`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], cache: Path, logs: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # tests/ and its folders on the path: runs may name test stages and callbacks
    # (probe_stage.ProbeStage, deepspeed_probe.SwitchProbe, test_fsdp2.RankProbe in tests/e2e/)
    tests = [str(ROOT / "tests" / sub) for sub in ("", "unit", "integration", "e2e")]
    path = os.pathsep.join(p for p in (*tests, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    cmd = [sys.executable, "train.py", *args, f"paths.cache_dir={cache}", f"paths.log_dir={logs}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def compose_cfg(overrides: list[str], cache: Path, out: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "debug=fast",
                f"paths.cache_dir={cache}",
                f"paths.output_dir={out}",
                f"paths.root_dir={out}",
                *overrides,
            ],
        )


def fit(cfg, extra_callbacks=()):
    from stages.runner import build

    objs = build(cfg)
    trainer: L.Trainer = objs["trainer"]
    trainer.callbacks.extend(extra_callbacks)
    trainer.fit(objs["stage"], datamodule=objs["datamodule"], ckpt_path=cfg.get("ckpt_path"))
    return trainer, objs["stage"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
