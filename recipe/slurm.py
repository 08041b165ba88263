"""The chain as SLURM jobs.

With `hydra/launcher=slurm` (hydra-submitit-launcher's config) each unfinished stage is
submitted as a job that depends (`afterok`) on the jobs of the stages it needs; a job resumes
its stage from `last.ckpt` when it is requeued. Stages already submitted and still queued or
running are depended on, not submitted again.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from recipe.chain import TRAIN_PY, ChainStage, stage_overrides

log = logging.getLogger(__name__)

JOB = "recipe_job.json"


def slurm_launcher() -> dict[str, Any] | None:
    """hydra-submitit-launcher's SLURM config when `hydra/launcher=slurm` was chosen, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().get("launcher")
    if launcher is None or "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return None
    return OmegaConf.to_container(launcher, resolve=True)


class StageJob:
    """What a SLURM job of the chain runs: decides at start (and at each requeue) whether the
    stage resumes from its `last.ckpt`, then runs `train.py` in every task of the job (Lightning
    reads the ranks from SLURM's environment). Requeued on timeout or preemption (submitit's
    checkpoint protocol; train.py saves `last.ckpt` on the SIGTERM that precedes it)."""

    def __init__(self, stage: ChainStage, by_name: dict[str, ChainStage], passthrough: list[str], recipe_name: str):
        self.stage, self.by_name, self.passthrough, self.recipe_name = stage, by_name, passthrough, recipe_name

    def __call__(self) -> None:
        if self.stage.finished:
            return
        args = stage_overrides(self.stage, self.by_name, self.passthrough, self.recipe_name)
        rc = subprocess.call([sys.executable, str(TRAIN_PY), *args])
        if rc != 0:
            raise RuntimeError(f"stage {self.stage.name} exited with {rc}")

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(
            StageJob(self.stage, self.by_name, self.passthrough, self.recipe_name)
        )


def _queued(job_id: str) -> bool:
    """Whether SLURM still has the job pending or running (a finished or failed one is not)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() in (
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "REQUEUED",
        "SUSPENDED",
        "COMPLETING",
    )


def submit_chain(
    stages: list[ChainStage],
    by_name: dict[str, ChainStage],
    passthrough: list[str],
    recipe_name: str,
    root: Path,
    launcher: dict[str, Any],
) -> dict[str, str]:
    """Submit each unfinished stage as a SLURM job depending on its parents' jobs.

    `launcher` is hydra-submitit-launcher's config (`conf/hydra/launcher/slurm.yaml`); its keys
    map to submitit's parameters as that launcher maps them. Returns stage -> job id."""
    import submitit

    skip = ("_target_", "submitit_folder", "name", "array_parallelism", "setup", "max_num_timeout")
    params = {k: v for k, v in launcher.items() if k not in skip and v is not None}
    setup = list(launcher.get("setup") or [])
    base = {
        "timeout_min",
        "nodes",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "mem_gb",
        "name",
        "stderr_to_stdout",
    }
    extra = dict(params.pop("additional_parameters", {}) or {})
    params = {k if k in base else f"slurm_{k}": v for k, v in params.items()}
    jobs: dict[str, str] = {}
    for stage in stages:
        if stage.finished:
            log.info("recipe stage %s: finished earlier, not submitted", stage.name)
            continue
        record = stage.dir / JOB
        if record.exists():
            job_id = json.loads(record.read_text())["job_id"]
            if _queued(job_id):
                log.info("recipe stage %s: job %s already queued, depended on", stage.name, job_id)
                jobs[stage.name] = job_id
                continue
        after = [jobs[p] for p in stage.needs if p in jobs]
        executor = submitit.AutoExecutor(
            folder=str(root / "slurm" / "%j"),
            cluster="slurm",
            slurm_max_num_timeout=int(launcher.get("max_num_timeout") or 0),
        )
        dependency = {"dependency": "afterok:" + ":".join(after)} if after else {}
        executor.update_parameters(
            **params,
            name=f"{recipe_name}-{stage.name}",
            slurm_additional_parameters={**extra, **dependency},
            **({"slurm_setup": setup} if setup else {}),
        )
        job = executor.submit(StageJob(stage, by_name, passthrough, recipe_name))
        stage.dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"job_id": str(job.job_id), "after": after}))
        jobs[stage.name] = str(job.job_id)
        print(f"recipe stage {stage.name}: SLURM job {job.job_id}" + (f" after {', '.join(after)}" if after else ""))
    return jobs
