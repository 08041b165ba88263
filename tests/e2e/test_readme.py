"""The README's first two commands are what a new user runs and what CI runs (.ci/run); every
train.py / eval.py command in README.md and docs/*.md composes; every relative link in them
resolves."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_opens_with_the_main_job_then_the_test_command():
    text = (ROOT / "README.md").read_text()
    first, second = bash_blocks(text)[:2]
    assert first.startswith("python3 -m venv .venv") and "pip install -e ." in first
    assert first.endswith("&& python train.py"), first  # the main job with its defaults, no overrides
    assert second.startswith("python3 -m venv .venv") and "pip install -e '.[dev]'" in second
    assert second.endswith("&& pytest"), second
    assert text.index("<!-- test-command -->") < text.index(second)


def test_ci_extracts_exactly_the_readme_test_command():
    """.ci/run's sed pipeline, run on the README, yields the second block verbatim."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"cmd=\$\((.*)\)\n", script).group(1)
    out = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == bash_blocks((ROOT / "README.md").read_text())[1]


# --- Every train.py / eval.py command in the bash blocks of README.md and docs/*.md composes ---
# Each command runs with `--cfg job` appended: Hydra parses the overrides and composes the
# config, prints it and exits; nothing is trained, built or loaded, so commands naming files
# that do not exist here (shards, checkpoints, tokenizers) compose as well. Hydra refuses
# `--cfg` together with `-m`, so a sweep is expanded and each of its runs composed on its own.
# `python -m siglip2.export` is not a Hydra app (it loads the checkpoint straight away), and
# install lines (`python3 -m venv ...`, `pip ...`) are not usage: neither is collected here.
import itertools
import os
import shlex
import sys

import pytest

HYDRA_APPS = ("train.py", "eval.py")
PLACEHOLDER = re.compile(r"<([A-Za-z_][\w-]*)>")  # <run>, <ckpt>: the user's own paths


def readme_hydra_commands(text: str) -> list[str]:
    """The `python train.py ...` / `python eval.py ...` commands of the bash blocks, one per
    command, continuation lines joined, trailing comments dropped."""
    commands = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#") or line.startswith(("pip ", "python3 -m venv")):
                continue
            # A line may chain commands: split on the shell's separators, outside quotes.
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            segments, current = [], []
            for token in lexer:
                if token in ("&&", "||", ";", "&", "|"):
                    segments.append(current)
                    current = []
                else:
                    current.append(token)
            segments.append(current)
            for tokens in segments:
                if tokens[:1] == ["python"] and tokens[1:2] and tokens[1] in HYDRA_APPS:
                    commands.append(shlex.join(tokens))
    return commands


def expand_sweep(args: list[str]) -> list[list[str]]:
    """Overrides of a `-m` run -> the override lists of its runs (basic sweeper: the product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(run) for run in itertools.product(*choices)]


def compose_runs(command: str) -> list[list[str]]:
    """The argv lists (without the interpreter) that compose `command`'s run(s) with --cfg job."""
    tokens = shlex.split(PLACEHOLDER.sub(r"PLACEHOLDER_\1", command))
    script, args = tokens[1], tokens[2:]
    if "-m" in args or "--multirun" in args:
        args = [a for a in args if a not in ("-m", "--multirun")]
        return [[script, *run, "--cfg", "job"] for run in expand_sweep(args)]
    return [[script, *args, "--cfg", "job"]]


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_COMMANDS = readme_hydra_commands((ROOT / "README.md").read_text())
# (page, command) for every page: the README is the front door, docs/ holds the rest.
DOC_COMMANDS = [
    (doc.relative_to(ROOT).as_posix(), command) for doc in DOCS for command in readme_hydra_commands(doc.read_text())
]


def test_readme_usage_commands_are_collected():
    """Guard against a vacuous pass: the Usage block's commands, the sweep and the real run."""
    assert len(README_COMMANDS) >= 8, README_COMMANDS
    assert any(" -m " in c for c in README_COMMANDS), README_COMMANDS
    assert any("data.train" in c and "trainer.num_nodes=8" in c for c in README_COMMANDS), README_COMMANDS
    assert any(c.startswith("python eval.py") for c in README_COMMANDS), README_COMMANDS
    assert compose_runs("python train.py -m optim.lr=1e-3,3e-4 debug=fast") == [
        ["train.py", "optim.lr=0.001", "debug=fast", "--cfg", "job"],
        ["train.py", "optim.lr=0.0003", "debug=fast", "--cfg", "job"],
    ]


def test_docs_commands_are_collected():
    """Guard against a vacuous pass over docs/: the pages that hold commands give them up."""
    pages = {page for page, _ in DOC_COMMANDS}
    for page in ("docs/recipe.md", "docs/finetune.md", "docs/own_data.md", "docs/results.md"):
        assert page in pages, (page, sorted(pages))
    recipe = [c for page, c in DOC_COMMANDS if page == "docs/recipe.md"]
    for stage in ("stage=resadapt", "stage=naflex", "stage=acid", "experiment=recipe_b16"):
        assert any(stage in c for c in recipe), (stage, recipe)


@pytest.mark.parametrize(
    "page,command", [pytest.param(page, command, id=f"{page}: {command}") for page, command in DOC_COMMANDS]
)
def test_readme_command_composes(page, command):
    """Composed in this process with the entry point's own config (what `--cfg job` does
    before printing; a subprocess per command costs ~15 s of imports on 2 cores)."""
    from hydra import compose, initialize_config_dir

    try:
        runs = compose_runs(command)
    except Exception as e:  # a sweep whose overrides Hydra cannot parse
        pytest.fail(f"{page} command does not parse as Hydra overrides:\n  {command}\n{e}")
    for argv in runs:
        script, overrides = argv[0], argv[1:-2]  # drop "--cfg job"
        config_name = {"train.py": "train", "eval.py": "eval"}[script]
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                compose(config_name, overrides=overrides)
        except Exception as e:
            pytest.fail(f"{page} command fails to compose:\n  {command}\nas: {config_name} {overrides}\n{e}")
        from stages.overrides import check_overrides  # what train.py / eval.py check before Hydra

        assert check_overrides(config_name, overrides) == [], (page, command)


def test_the_cli_composes_like_the_test_does():
    """One real `--cfg job` through train.py, so the in-process compose above stays the CLI's."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    argv = ["train.py", 'data.train="/shards/{00000..00009}.tar"', "data=webdataset", "--cfg", "job"]
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "/shards/{00000..00009}.tar" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "train.py", "data.train=/shards/{00000..00009}.tar", "--cfg", "job"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "mismatched input" in bad.stderr


# --- Every relative link of README.md and docs/*.md resolves ---------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower-cased, punctuation dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_doc_links_resolve(doc):
    """A page moved into docs/ keeps working links: every relative target exists, and an
    anchor into a markdown page names one of its headings."""
    text = doc.read_text()
    bad = []
    for target in LINK.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
            bad.append(target)
    assert not bad, bad
