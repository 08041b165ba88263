"""Command-line overrides checked against the composed config before Hydra or anything else runs.

Hydra answers a misspelt key (`data.batch_szie=32`) with "Key 'batch_szie' is not in struct"
and a hint to add `+`, which then fails deep inside a constructor (`TypeError: unexpected
keyword argument`, reported under another key); a bad value (`optim.lr=abc`) fails at its
first use (`'<' not supported between 'str' and 'int'`). `check_overrides` names the key and
the closest existing one, or the key and the type its default has, for every config group
(the stage's own keys are typed again by `siglip2.config.from_dict`).

- A plain `key=value` whose key does not exist: error, with the closest key of its parent.
- `+key=value` (an addition) whose last part is one edit away from an existing sibling
  (`+model.vision.widht`): error, it is a typo; other additions pass (Lightning's Trainer, for
  one, takes many arguments its yaml does not list).
- A value whose type is not the default's (text where a number or a boolean is expected;
  null always allowed): error naming the key, the expected type and the value. Not for
  `trainer.*`, `callbacks.*`, `logger.*`: Lightning validates those itself, and takes several
  types for one key (`trainer.devices=auto`).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
# Groups whose values their consumer validates with clear messages of its own, and which take
# several types for one key (Lightning's `trainer.devices=auto|-1|[0,3]`): keys checked, not types.
_OWN_VALIDATION = ("trainer", "callbacks", "logger", "hydra")
_ABSENT = object()


def _split(arg: str) -> tuple[str, str, str] | None:
    """(prefix, key, value) of a `key=value` override; None for flags and group choices."""
    if arg.startswith("-") or "=" not in arg:
        return None
    key, value = arg.split("=", 1)
    prefix = ""
    while key[:1] in "+~":
        prefix, key = prefix + key[0], key[1:]
    if key.split(".")[0] == "hydra" or "@" in key or ("." not in key and (CONF / key).is_dir()):
        return None  # a group choice (`data=webdataset`, `model=b16`), Hydra's own, a package
    return prefix, key, value


def _parsed(key: str, value: str) -> Any:
    """The value as Hydra parses it (`1e-3` a float, `yes` a string, `[a,b]` a list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"{key}={value}").value()
    except Exception:
        return value


def _node(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False)
    except Exception:
        return _ABSENT


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return None


def _problem(cfg: DictConfig, prefix: str, key: str, value: str) -> str | None:
    parent_key, _, leaf = key.rpartition(".")
    parent = _node(cfg, parent_key) if parent_key else cfg
    siblings = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    if "~" in prefix or (isinstance(parent, DictConfig) and leaf in siblings and OmegaConf.is_missing(parent, leaf)):
        return None  # a deletion, or a required value (`???`) being given
    current = _node(cfg, key) if leaf in siblings or not isinstance(parent, DictConfig) else _ABSENT
    if current is _ABSENT and isinstance(parent, DictConfig) and leaf in siblings:
        return None  # there, but not selectable as a value here (an interpolation to what is absent)
    if current is _ABSENT:
        from siglip2.config import moved_to

        if moved_to(key) and "~" not in prefix:
            return f"'{key}' moved to '{moved_to(key)}'"
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.75)
        near = f"{parent_key}.{close[0]}" if close and parent_key else (close[0] if close else "")
        if "+" in prefix:  # an addition: a typo only when it is one edit away from a sibling
            if close and _one_edit(leaf, close[0]):
                return f"'+{key}' adds a key next to '{near}': a typo? (set '{near}=...')"
            return None
        hint = (
            f" (did you mean '{near}'?)"
            if close
            else (
                f"; '{parent_key}' has: {', '.join(sorted(siblings))}" if parent_key and 0 < len(siblings) <= 30 else ""
            )
        )
        return f"unknown key '{key}'{hint}"
    if key.split(".")[0] in _OWN_VALIDATION:
        return None
    expected = _kind(current) if not isinstance(current, (DictConfig, ListConfig)) else None
    if expected is None or value.strip() in ("", "null", "None") or "," in value or "(" in value or "${" in value:
        return None  # nodes, nulls, sweeps (a,b), sweep functions, interpolations: Hydra's to parse
    given = _parsed(key, value)
    if given is None or _kind(given) in (None, expected) or expected == "a string":
        return None  # a list or dict for a scalar is left to the consumer; numbers are valid strings
    return f"{key}={value}: expected {expected} (its default is {current!r})"


def _one_edit(a: str, b: str) -> bool:
    """Whether `a` is one insertion, deletion, substitution or adjacent swap from `b`."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (
            len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
        )
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def check_overrides(config_name: str, argv: Sequence[str]) -> list[str]:
    """The problems of the command line's `key=value` overrides, checked against the config
    `config_name` composed with the command line's group choices and additions (so
    `model=b16 model.vision.width=...` is checked against b16). Empty when all is well, or
    when composing fails (Hydra then reports it itself)."""
    from hydra import compose, initialize_config_dir

    args = [a for a in argv if not a.startswith("-")]
    unparsable = [problem for a in args for problem in [_grammar_problem(a)] if problem]
    if unparsable:
        return unparsable
    parsed = [(a, _split(a)) for a in args]
    base = [a for a, p in parsed if p is None and not a.startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name,
                overrides=[a.split("=")[0] + "=" + a.split("=", 1)[1].split(",")[0] if "," in a else a for a in base],
            )
    except Exception:
        return [p for a in base for p in [_group_problem(a)] if p]  # else Hydra reports it itself
    problems = []
    given = [p[1] for _, p in parsed if p is not None]
    for key in sorted({k for k in given if given.count(k) > 1}):
        values = [p[2] for _, p in parsed if p is not None and p[1] == key]
        # A key given again is how the recipe driver lets a stage's own value win (the last one
        # counts); only values alike but for their numbers are a `{a..b}` pattern the shell expanded.
        skeletons = {re.sub(r"\d+", "#", v) for v in values}
        if len(set(values)) == len(values) and len(skeletons) == 1 and "/" in next(iter(skeletons)):
            problems.append(
                f"'{key}' is given {len(values)} times ({values[0]}, {values[1]}, ...), and only the last "
                f"one counts: an unquoted {{a..b}} shard pattern the shell expanded? Quote it: "
                f"'{key}=\"/data/{{00000..00999}}.tar\"'"
            )
    for _, p in parsed:
        if p is not None:
            problem = _problem(cfg, *p)
            if problem:
                problems.append(problem)
    for key in _missing(OmegaConf.to_container(cfg, resolve=False)):
        if key not in given:
            problems.append(f"'{key}' has no default and is required: add {key}=...")
    problem = _demo_tokenizer_without_demo(cfg)
    if problem:
        problems.append(problem)
    return problems


def _demo_tokenizer_without_demo(cfg) -> str | None:
    """tokenizer=demo (the default) reads the demo's SentencePiece model, which a data config
    without a demo (data=webdataset) does not build: said plainly, not as an interpolation error."""
    tok, data = cfg.get("tokenizer"), cfg.get("data")
    if tok is None or data is None or "demo" not in data:
        return None
    demo = data.get("demo")
    if demo is not None and "root" in demo:  # (debug=fast sets demo.num_train even without a demo)
        return None
    path = OmegaConf.to_container(tok, resolve=False).get("path") if OmegaConf.is_dict(tok) else None
    if isinstance(path, str) and "data.demo" in path:
        return (
            "the default tokenizer (tokenizer=demo) is the demo's, and this data config builds no demo: name "
            "yours, e.g. tokenizer=sentencepiece tokenizer.path=<.model file> (python -m siglip2.data.tokenizer "
            "train writes one) or tokenizer=hf tokenizer.path=<folder>"
        )
    return None


def _grammar_problem(arg: str) -> str | None:
    """The override as Hydra's grammar would reject it, with the quoting that fixes it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "=" not in arg:
        return None  # Hydra reports a bare word itself
    try:
        OverridesParser.create().parse_override(arg)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key, value = arg.split("=", 1)
        return (
            f"could not parse the override '{arg}' ({reason}). Hydra's override grammar needs a value "
            f"with brackets, braces, commas or spaces quoted inside the shell's quotes: "
            f"\"{key}='{value}'\", or a list written whole: '{key}=[1,2]' "
            f"(https://hydra.cc/docs/advanced/override_grammar/basic/)"
        )
    return None


def _group_problem(arg: str) -> str | None:
    """`group=option` naming an option that is not in conf/<group>/: the closest one and the list."""
    key, _, value = arg.lstrip("+~").partition("=")
    folder = CONF / key.split("@")[0].replace(".", "/")
    if not folder.is_dir() or (folder / f"{value}.yaml").is_file() or "," in value:
        return None
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    close = difflib.get_close_matches(value, options, n=1)
    hint = f" (did you mean '{key}={close[0]}'?)" if close else ""
    return f"'{arg}': conf/{key}/ has no '{value}'{hint}; its options: {', '.join(options)}"


def _missing(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is `???` (required, no default), without resolving anything."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


def exit_on_bad_overrides(prog: str, config_name: str, argv: Sequence[str]) -> None:
    """`check_overrides`, and on any problem: one line each on stderr, exit code 2."""
    import sys

    problems = check_overrides(config_name, argv)
    if problems:
        for line in problems:
            print(f"{prog}: error: {line}", file=sys.stderr)
        raise SystemExit(2)
