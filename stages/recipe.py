"""The SigLIP 2 recipe as one command: a chain of stages, each its own `train.py` run.

`python train.py experiment=recipe_demo` composes a config with a `recipe:` block (below) and
`stages.runner.run` hands it here instead of training. Each stage of the chain is a separate
process (`python train.py <its overrides>`, so DDP's launcher and SLURM see an ordinary run)
with its own output folder under one recipe folder; stages hand off through checkpoints as
DESIGN.md says (pretraining's `frac_0.95.ckpt` -> resolution adaptation, `frac_0.90.ckpt` ->
NaFlex, a finished model + a bigger teacher -> ACID) [P §2.4-2.5].

A recipe config::

    recipe:
      name: demo                       # the folder: <recipe.dir> = logs/recipes/<name>
      common: {groups: {...}, set: {...}}   # every stage (before its own)
      stages:                          # run in this order
        teacher: {set: {trainer: {max_steps: 750}, model: {...}}}
        pretrain: {}
        resadapt: {groups: {stage: resadapt}, init_from: ckpt:pretrain/frac_0.95, set: {...}}
        acid: {groups: {stage: acid}, init_from: ckpt:pretrain/last,
               set: {stage: {acid: {teacher: ckpt:teacher/last}}}}

`groups` are config-group choices (`stage=acid`), `set` a nested block of values flattened to
dotted overrides (`stage.acid.filter_ratio=0.5`); `ckpt:<stage>/<file>` anywhere names that
stage's `checkpoints/<file>.ckpt` and makes it a dependency. The command line's own overrides
(other than `experiment=` and `recipe.*`) go to every stage, before the stage's own.

Each stage's folder is `<recipe.dir>/<i>_<stage>-<hash>`, the hash covering its overrides and
those of the stages it depends on: a sweep (`-m`) over one stage's knobs reuses the finished
earlier stages, and a changed stage never passes for a finished one.

Resumable: a stage with `metrics.json` is finished and skipped; one with `checkpoints/last.ckpt`
resumes with `ckpt_path=` (exact at epoch boundaries, `tests/e2e/test_recipe.py`); otherwise it
starts with `init_from=`. Killed anywhere, the same command picks up where it was.

At the end: `<recipe.dir>/recipe.json` and a printed table of every stage's evaluation
numbers, wall time (summed over attempts) and examples seen.

SLURM: with `hydra/launcher=slurm` (hydra-submitit-launcher's config) each unfinished stage is
submitted as a job that depends (`afterok`) on the jobs of the stages it needs; a job resumes
its stage from `last.ckpt` when it is requeued. Stages already submitted and still queued or
running are depended on, not submitted again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
CKPT_REF = re.compile(r"^ckpt:([A-Za-z_][\w-]*)/([\w.-]+)$")
FINISHED = "metrics.json"
ATTEMPTS = "recipe_attempts.jsonl"
JOB = "recipe_job.json"
# Metric families that make the table (what `eval=demo` and the eval suite report).
TABLE_PREFIXES = ("zeroshot/", "retrieval/", "refexp/", "segmentation/")


@dataclass
class ChainStage:
    """One stage of the chain: its name, position, overrides and dependencies."""
    name: str
    index: int
    groups: dict[str, str]
    values: list[tuple[str, Any]]          # flattened `set`, in order (common first)
    init_from: str | None                  # a `ckpt:` reference, a path, or None
    needs: list[str] = field(default_factory=list)
    key: str = ""                          # hash of everything that defines its result
    dir: Path = Path()

    def checkpoint(self, file: str = "last") -> Path:
        return self.dir / "checkpoints" / f"{file}.ckpt"

    @property
    def finished(self) -> bool:
        return (self.dir / FINISHED).exists()


def flatten(block: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """{'a': {'b': 1}, 'c': None} -> [('a.b', 1), ('c', None)]. Lists and scalars are leaves."""
    if isinstance(block, DictConfig):
        block = OmegaConf.to_container(block, resolve=True)
    if not isinstance(block, dict):
        return [(prefix, block)]
    if not block and prefix:
        return [(prefix, {})]
    out: list[tuple[str, Any]] = []
    for key, value in block.items():
        out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def hydra_value(value: Any) -> str:
    """A Python value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[\w./:@+-]+", text) and _parses_as(text) == text:  # not a number, bool or null
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _parses_as(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"k={text}").value()
    except Exception:  # noqa: BLE001 - anything Hydra cannot read back is quoted
        return None


# Under `debug=...` (a smoke run of the whole chain) a stage's own steps give way to the debug
# config's, unless the command line set them for that stage (`recipe.stages.<name>.set.<key>`).
DEBUG_YIELDS = ("trainer.max_steps",)


def parse_chain(recipe: DictConfig, root: Path, passthrough: list[str],
                explicit: frozenset[str] = frozenset()) -> list[ChainStage]:
    """The recipe block -> stages in order, with dependencies, hashes and folders.

    `explicit`: the `recipe.*` keys the command line set (`recipe_command_line_keys`). Under a
    `debug=` choice in `passthrough`, a stage's own `DEBUG_YIELDS` values not in `explicit`
    are dropped, so `debug=fast` is a smoke run in every stage (the teacher's 1,500 steps and
    ACID's 300 were not). Raises ValueError for a reference to an unknown or later stage."""
    debug = any(a.lstrip("+").split("=")[0] == "debug" for a in passthrough)
    common = recipe.get("common") or {}
    stages: list[ChainStage] = []
    by_name: dict[str, ChainStage] = {}
    for index, (name, spec) in enumerate((recipe.get("stages") or {}).items()):
        spec = spec or {}
        groups = {**dict(common.get("groups") or {}), **dict(spec.get("groups") or {})}
        values = flatten(common.get("set") or {}) + flatten(spec.get("set") or {})
        if debug:
            dropped = [k for k, _ in values if k in DEBUG_YIELDS and f"recipe.stages.{name}.set.{k}" not in explicit]
            if dropped:
                log.info("recipe stage %s: %s from the debug config, not the stage's own", name, ", ".join(dropped))
            values = [(k, v) for k, v in values if k not in dropped]
        init_from = spec.get("init_from")
        refs = [init_from] if isinstance(init_from, str) and CKPT_REF.match(init_from) else []
        refs += [v for _, v in values if isinstance(v, str) and CKPT_REF.match(v)]
        needs = []
        for ref in refs:
            parent = CKPT_REF.match(ref).group(1)
            if parent not in by_name:
                raise ValueError(f"recipe stage '{name}' refers to '{ref}', but '{parent}' is not an earlier stage "
                                 f"of the recipe (stages so far: {list(by_name)})")
            if parent not in needs:
                needs.append(parent)
        stage = ChainStage(str(name), index, {str(k): str(v) for k, v in groups.items()}, values,
                           str(init_from) if init_from else None, needs)
        digest = hashlib.sha256(json.dumps(
            {"name": stage.name, "groups": stage.groups, "values": [[k, v] for k, v in values],
             "init_from": stage.init_from, "passthrough": passthrough,
             "parents": [by_name[p].key for p in needs]}, sort_keys=True, default=str).encode()).hexdigest()
        stage.key = digest[:10]
        stage.dir = root / f"{index}_{stage.name}-{stage.key}"
        stages.append(stage)
        by_name[stage.name] = stage
    if not stages:
        raise ValueError("recipe.stages is empty")
    return stages


def resolve_ref(value: Any, by_name: dict[str, ChainStage]) -> Any:
    if isinstance(value, str):
        match = CKPT_REF.match(value)
        if match:
            return str(by_name[match.group(1)].checkpoint(match.group(2)))
    return value


def stage_overrides(stage: ChainStage, by_name: dict[str, ChainStage], passthrough: list[str],
                    recipe_name: str) -> list[str]:
    """The command line of `train.py` for this stage, deciding resume vs start now."""
    args = [f"{k}={hydra_value(v)}" for k, v in stage.groups.items()]
    args += passthrough
    args += [f"{k}={hydra_value(resolve_ref(v, by_name))}" for k, v in stage.values]
    last = stage.checkpoint("last")
    if last.exists():
        args.append(f"ckpt_path={hydra_value(str(last))}")
    elif stage.init_from:
        args.append(f"init_from={hydra_value(resolve_ref(stage.init_from, by_name))}")
    args += [f"hydra.run.dir={hydra_value(str(stage.dir))}", f"task_name={stage.name}",
             f"+recipe_run={hydra_value(recipe_name)}"]
    return args


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
    from siglip2.checkpoint import load_plain

    metrics = json.loads((stage.dir / FINISHED).read_text())
    last = stage.checkpoint("last")
    if last.is_dir():  # DeepSpeed writes a directory; its meta is in the model-states file
        from siglip2.checkpoint_zero import read_zero_client_state

        ckpt = read_zero_client_state(last)
    else:
        ckpt = load_plain(last, mmap=True)
    meta = ckpt.get("siglip2", {})
    return {"dir": str(stage.dir), "init_from": stage.init_from,
            "overrides": [f"{k}={v}" for k, v in stage.groups.items()] + [f"{k}={v}" for k, v in stage.values],
            "global_step": int(ckpt.get("global_step", 0)),
            "examples_seen": int(meta.get("examples_seen", 0)), "wall_s": round(wall_seconds(stage), 1),
            "image_size": (meta.get("model") or {}).get("vision", {}).get("image_size"),
            "metrics": {k: v for k, v in metrics.items() if k.startswith(TABLE_PREFIXES)}}


def table(summary: dict[str, dict[str, Any]]) -> str:
    """Metrics as rows, stages as columns (markdown)."""
    names = list(summary)
    keys = sorted({k for s in summary.values() for k in s["metrics"] if "/num_" not in k})
    rows = [["metric", *names], ["---"] * (len(names) + 1)]
    for key in keys:
        rows.append([key, *(f"{100 * s['metrics'][key]:.1f}" if key in s["metrics"] else "-"
                            for s in summary.values())])
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


def recipe_command_line_keys() -> frozenset[str]:
    """The `recipe.*` keys this run's command line sets."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return frozenset()
    keys = (item.lstrip("+~").split("=")[0] for item in HydraConfig.get().overrides.task)
    return frozenset(k for k in keys if k.startswith("recipe."))


def command_line_overrides() -> list[str]:
    """This run's command-line overrides that every stage gets (not `experiment=`, `recipe.*`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keep = []
    for item in HydraConfig.get().overrides.task:
        key = item.lstrip("+~").split("=")[0]
        if key == "experiment" or key.split(".")[0].split("/")[0] in ("recipe", "hydra") or key in ("ckpt_path",
                                                                                                 "init_from"):
            continue
        keep.append(item)
    return keep


def slurm_launcher() -> dict[str, Any] | None:
    """hydra-submitit-launcher's SLURM config when `hydra/launcher=slurm` was chosen, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().get("launcher")
    if launcher is None or "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return None
    return OmegaConf.to_container(launcher, resolve=True)


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
                log.error("recipe stage %s stopped (exit code %d); its log is in %s. Run the same command "
                          "again to resume it.", stage.name, rc, stage.dir)
                raise SystemExit(rc or 1)
        summary = {s.name: stage_summary(s) for s in stages}
    result = {"recipe": str(recipe.name), "dir": str(root), "stages": summary,
              "wall_s": round(sum(s["wall_s"] for s in summary.values()), 1),
              "driver_wall_s_this_call": round(time.time() - started, 1)}
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
    print(f"\nrecipe {recipe.name}: {root}\n{table(summary)}\n\nrecipe.json written to "
          + " and ".join(str(p) for p in outputs))
    return None


# ---- SLURM ---------------------------------------------------------------------------------

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

        return submitit.helpers.DelayedSubmission(StageJob(self.stage, self.by_name, self.passthrough,
                                                           self.recipe_name))


def _queued(job_id: str) -> bool:
    """Whether SLURM still has the job pending or running (a finished or failed one is not)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED",
                                                         "SUSPENDED", "COMPLETING")


def submit_chain(stages: list[ChainStage], by_name: dict[str, ChainStage], passthrough: list[str],
                 recipe_name: str, root: Path, launcher: dict[str, Any]) -> dict[str, str]:
    """Submit each unfinished stage as a SLURM job depending on its parents' jobs.

    `launcher` is hydra-submitit-launcher's config (`conf/hydra/launcher/slurm.yaml`); its keys
    map to submitit's parameters as that launcher maps them. Returns stage -> job id."""
    import submitit

    skip = ("_target_", "submitit_folder", "name", "array_parallelism", "setup", "max_num_timeout")
    params = {k: v for k, v in launcher.items() if k not in skip and v is not None}
    setup = list(launcher.get("setup") or [])
    base = {"timeout_min", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "name",
            "stderr_to_stdout"}
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
        executor = submitit.AutoExecutor(folder=str(root / "slurm" / "%j"), cluster="slurm",
                                         slurm_max_num_timeout=int(launcher.get("max_num_timeout") or 0))
        dependency = {"dependency": "afterok:" + ":".join(after)} if after else {}
        executor.update_parameters(**params, name=f"{recipe_name}-{stage.name}",
                                   slurm_additional_parameters={**extra, **dependency},
                                   **({"slurm_setup": setup} if setup else {}))
        job = executor.submit(StageJob(stage, by_name, passthrough, recipe_name))
        stage.dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"job_id": str(job.job_id), "after": after}))
        jobs[stage.name] = str(job.job_id)
        print(f"recipe stage {stage.name}: SLURM job {job.job_id}" + (f" after {', '.join(after)}" if after else ""))
    return jobs
