"""The chain on this machine: each unfinished stage a `train.py` subprocess, in order.

Resumable: a stage with `metrics.json` is finished and skipped; one with `checkpoints/last.ckpt`
resumes with `ckpt_path=` (exact at epoch boundaries, `tests/e2e/test_recipe.py`); otherwise it
starts with `init_from=`. Killed anywhere, the same command picks up where it was.

At the end: `<recipe.dir>/recipe.json` and a printed table of every stage's evaluation
numbers, wall time (summed over attempts) and examples seen.

`run_recipe` is the entry point; with `hydra/launcher=slurm` it hands the chain to
`recipe.slurm.submit_chain` instead of running it here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from recipe.chain import (
    FINISHED,
    TRAIN_PY,
    ChainStage,
    command_line_overrides,
    parse_chain,
    recipe_command_line_keys,
    stage_overrides,
)
from recipe.slurm import slurm_launcher, submit_chain

log = logging.getLogger(__name__)

ATTEMPTS = "recipe_attempts.jsonl"
# Metric families that make the table (what `eval=demo` and the eval suite report).
TABLE_PREFIXES = ("zeroshot/", "retrieval/", "refexp/", "segmentation/")


def _die_with_parent() -> None:  # a kill -9 of the chain takes its running stage with it (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _record(stage: ChainStage, **fields: Any) -> None:
    stage.dir.mkdir(parents=True, exist_ok=True)
    with open(stage.dir / ATTEMPTS, "a") as f:
        f.write(json.dumps({"time": time.time(), **fields}) + "\n")


def run_stage(stage: ChainStage, args: list[str]) -> int:
    """Run `train.py` for one stage in a child process; its attempts are logged for wall time."""
    cmd = [sys.executable, str(TRAIN_PY), *args]
    log.info("recipe stage %s: %s", stage.name, " ".join(cmd[1:]))
    _record(stage, event="start", args=args)
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C / SIGTERM of the chain: the stage gets SIGTERM and saves last.ckpt
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        _record(stage, event="end", rc=proc.returncode)
        raise
    _record(stage, event="end", rc=rc)
    return rc


def wall_seconds(stage: ChainStage) -> float:
    """Seconds spent in this stage over all attempts; an attempt killed without an end record
    counts until the newest file it wrote."""
    path = stage.dir / ATTEMPTS
    if not path.exists():
        return 0.0
    total, start = 0.0, None
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "start":
            if start is not None:
                total += max(0.0, _newest_write(stage.dir, start) - start)
            start = event["time"]
        elif start is not None:
            total += event["time"] - start
            start = None
    if start is not None:
        total += max(0.0, _newest_write(stage.dir, start) - start)
    return total


def _newest_write(folder: Path, since: float) -> float:
    times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and p.name != ATTEMPTS]
    later = [t for t in times if t >= since]
    return max(later) if later else since


def stage_summary(stage: ChainStage) -> dict[str, Any]:
    from siglip2.checkpoint import read_meta  # a DeepSpeed folder too; tensors and plain values only

    metrics = json.loads((stage.dir / FINISHED).read_text())
    meta, global_step = read_meta(stage.checkpoint("last"))
    return {
        "dir": str(stage.dir),
        "init_from": stage.init_from,
        "overrides": [f"{k}={v}" for k, v in stage.groups.items()] + [f"{k}={v}" for k, v in stage.values],
        "global_step": global_step,
        "examples_seen": int(meta.examples_seen or 0),
        "wall_s": round(wall_seconds(stage), 1),
        "image_size": (meta.model or {}).get("vision", {}).get("image_size"),
        "metrics": {k: v for k, v in metrics.items() if k.startswith(TABLE_PREFIXES)},
    }


def table(summary: dict[str, dict[str, Any]]) -> str:
    """Metrics as rows, stages as columns (markdown)."""
    names = list(summary)
    keys = sorted({k for s in summary.values() for k in s["metrics"] if "/num_" not in k})
    rows = [["metric", *names], ["---"] * (len(names) + 1)]
    for key in keys:
        rows.append(
            [key, *(f"{100 * s['metrics'][key]:.1f}" if key in s["metrics"] else "-" for s in summary.values())]
        )
    rows.append(["examples seen", *(f"{s['examples_seen']:,}" for s in summary.values())])
    rows.append(["steps", *(str(s["global_step"]) for s in summary.values())])
    rows.append(["wall time (min)", *(f"{s['wall_s'] / 60:.1f}" for s in summary.values())])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


@contextmanager
def recipe_lock(root: Path) -> Iterator[None]:
    """One chain driver per recipe folder at a time (released when the process dies)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another recipe driver is running in {root}; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _hydra_ready() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


def run_recipe(cfg: DictConfig) -> float | None:
    recipe = cfg.recipe
    root = Path(str(recipe.dir)).resolve()
    passthrough = command_line_overrides()
    stages = parse_chain(recipe, root, passthrough, recipe_command_line_keys())
    by_name = {s.name: s for s in stages}
    with recipe_lock(root):
        slurm = slurm_launcher()
        if slurm is not None:
            submit_chain(stages, by_name, passthrough, str(recipe.name), root, slurm)
            return None
        started = time.time()
        for stage in stages:
            if stage.finished:
                log.info("recipe stage %s: finished earlier (%s), skipped", stage.name, stage.dir)
                continue
            for parent in stage.needs:
                if not by_name[parent].finished:
                    raise RuntimeError(f"recipe stage {stage.name} needs {parent}, which did not finish")
            rc = run_stage(stage, stage_overrides(stage, by_name, passthrough, str(recipe.name)))
            if rc != 0 or not stage.finished:
                log.error(
                    "recipe stage %s stopped (exit code %d); its log is in %s. Run the same command "
                    "again to resume it.",
                    stage.name,
                    rc,
                    stage.dir,
                )
                raise SystemExit(rc or 1)
        summary = {s.name: stage_summary(s) for s in stages}
    result = {
        "recipe": str(recipe.name),
        "dir": str(root),
        "stages": summary,
        "wall_s": round(sum(s["wall_s"] for s in summary.values()), 1),
        "driver_wall_s_this_call": round(time.time() - started, 1),
    }
    # the recipe folder holds the latest call's table; each call's own output folder (one per
    # job of a -m sweep) keeps its own copy
    outputs = [root / "recipe.json"]
    own = cfg.get("paths", {}).get("output_dir") if _hydra_ready() else None
    if own and Path(str(own)).resolve() != root:
        outputs.append(Path(str(own)) / "recipe.json")
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
    print(
        f"\nrecipe {recipe.name}: {root}\n{table(summary)}\n\nrecipe.json written to "
        + " and ".join(str(p) for p in outputs)
    )
    return None
