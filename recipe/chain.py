"""The recipe block -> the chain's stages, and each stage's `train.py` command line.

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

A stage with `checkpoints/last.ckpt` resumes with `ckpt_path=`; otherwise it starts with
`init_from=` (`stage_overrides`, called when the stage starts, locally or as a SLURM job).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
CKPT_REF = re.compile(r"^ckpt:([A-Za-z_][\w-]*)/([\w.-]+)$")
FINISHED = "metrics.json"


@dataclass
class ChainStage:
    """One stage of the chain: its name, position, overrides and dependencies."""

    name: str
    index: int
    groups: dict[str, str]
    values: list[tuple[str, Any]]  # flattened `set`, in order (common first)
    init_from: str | None  # a `ckpt:` reference, a path, or None
    needs: list[str] = field(default_factory=list)
    key: str = ""  # hash of everything that defines its result
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


def parse_chain(
    recipe: DictConfig, root: Path, passthrough: list[str], explicit: frozenset[str] = frozenset()
) -> list[ChainStage]:
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
                raise ValueError(
                    f"recipe stage '{name}' refers to '{ref}', but '{parent}' is not an earlier stage "
                    f"of the recipe (stages so far: {list(by_name)})"
                )
            if parent not in needs:
                needs.append(parent)
        stage = ChainStage(
            str(name),
            index,
            {str(k): str(v) for k, v in groups.items()},
            values,
            str(init_from) if init_from else None,
            needs,
        )
        digest = hashlib.sha256(
            json.dumps(
                {
                    "name": stage.name,
                    "groups": stage.groups,
                    "values": [[k, v] for k, v in values],
                    "init_from": stage.init_from,
                    "passthrough": passthrough,
                    "parents": [by_name[p].key for p in needs],
                },
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()
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


def stage_overrides(
    stage: ChainStage, by_name: dict[str, ChainStage], passthrough: list[str], recipe_name: str
) -> list[str]:
    """The command line of `train.py` for this stage, deciding resume vs start now."""
    args = [f"{k}={hydra_value(v)}" for k, v in stage.groups.items()]
    args += passthrough
    args += [f"{k}={hydra_value(resolve_ref(v, by_name))}" for k, v in stage.values]
    last = stage.checkpoint("last")
    if last.exists():
        args.append(f"ckpt_path={hydra_value(str(last))}")
    elif stage.init_from:
        args.append(f"init_from={hydra_value(resolve_ref(stage.init_from, by_name))}")
    args += [
        f"hydra.run.dir={hydra_value(str(stage.dir))}",
        f"task_name={stage.name}",
        f"+recipe_run={hydra_value(recipe_name)}",
    ]
    return args


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
        if (
            key == "experiment"
            or key.split(".")[0].split("/")[0] in ("recipe", "hydra")
            or key in ("ckpt_path", "init_from")
        ):
            continue
        keep.append(item)
    return keep
