"""Typed configs from the plain dicts of the yaml files: unknown keys are errors, by name.

Every part that takes settings (a loss, the optimiser, a stage) declares them as a dataclass
whose defaults are the documented ones; `from_dict` builds it from a nested dict (what
`OmegaConf.to_container` gives), so a misspelt key (`losses.locca.parralel_prob`) fails
before any compute with its dotted path and the closest known name.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# Keys that moved: the error for the old path names the new one. A block that moved whole
# (`stage.recipe` -> `stage.clock`) moves every key under it (`moved_to`).
MOVED = {
    "stage.losses.masked.mask_ratio": "stage.views.mask_ratio",
    "stage.losses.local_to_global.local_views": "stage.views.local_count",
    "stage.recipe": "stage.clock",
    "callbacks.zeroshot_eval": "callbacks.eval_suite",
}


def moved_to(key: str) -> str | None:
    """Where the dotted config key `key` lives now, if it moved (`MOVED`), else None."""
    if key in MOVED:
        return MOVED[key]
    for old, new in MOVED.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def from_dict(cls: type[T], data: Mapping[str, Any] | T | None, where: str = "") -> T:
    """`cls(**data)` with nested dataclass fields built recursively.

    Raises `ValueError` naming the dotted path of every unknown key (with the closest known
    key, if one is close) and of every required key that is missing.
    """
    if isinstance(data, cls):
        return data
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=1)
            moved = moved_to(_path(where, key))
            hint = (
                f" (moved to '{moved}')" if moved else f" (did you mean '{_path(where, close[0])}'?)" if close else ""
            )
            lines.append(f"'{_path(where, key)}'{hint}")
        raise ValueError(f"unknown config key {', '.join(lines)}; {cls.__name__} takes {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing config key {', '.join(repr(_path(where, m)) for m in missing)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = _dataclass_of(hints.get(key))
        kwargs[key] = (
            from_dict(sub, value, _path(where, key)) if sub is not None and isinstance(value, Mapping) else value
        )
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as the plain nested dict `from_dict` reads back (for checkpoints)."""
    return dataclasses.asdict(obj)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass in a field's type hint (`X`, `X | None`, `Optional[X]`), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
