"""Fixtures shared by the tests of every folder, and the folders' marks.

tests/unit/: seconds each, no Trainer, no process launched, no demo built.
tests/integration/: in-process runs: a Lightning Trainer (usually `helpers.compose_cfg` / `fit`
with `debug=` configs) or a demo build; marked `integration`.
tests/e2e/: processes: train.py / eval.py / CLI runs, multi-process strategies and gloo ranks,
the main job, the recipe chain, README commands; marked `e2e`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
FOLDERS = ("unit", "integration", "e2e")

# Test modules lend helpers to one another across the folders (pictures, JPEG bytes, shards,
# a split module's fixtures): every folder is on the path, so a module is importable by its
# name (basenames are unique) whichever file pytest collects first. helpers.py and the probes
# launched by name (probe_stage, deepspeed_probe) are here in tests/, on the path as this
# file's folder.
for _name in reversed(FOLDERS):
    if str(TESTS / _name) not in sys.path:
        sys.path.insert(0, str(TESTS / _name))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    """Every test under tests/integration/ is marked `integration`, every test under
    tests/e2e/ `e2e` (`pytest -m "not e2e"` leaves out the process launches)."""
    for item in items:
        path = Path(str(item.path)).resolve()
        for folder in ("integration", "e2e"):
            if TESTS / folder in path.parents:
                item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (counts and compiles that must not depend on
    the machine's threads), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`tmp_path_factory.mktemp` for module-scoped fixtures whose folders are removed when the
    module's tests end (their runs write checkpoints of ~60-450 MB each; pytest would keep
    them to the end of the session, and CI's disk is shared with a ~6 GB venv)."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One `paths.cache_dir` for the whole session: the debug demo (400 samples, its
    tokenizer) is built once (~40 s) and read by every end-to-end test."""
    return tmp_path_factory.mktemp("siglip2-cache")


@pytest.fixture(scope="session")
def debug_pretrain(cache_dir, tmp_path_factory) -> Path:
    """The run folder of one `debug=fast` pretraining run (6 steps, self-distillation from
    step 5), whose hand-off checkpoints the later stages start from. Treat as read-only."""
    from helpers import compose_cfg, fit

    out = tmp_path_factory.mktemp("debug-pretrain")
    _, stage = fit(compose_cfg([], cache_dir, out))
    assert stage.loss_enabled["local_to_global"] and stage.loss_enabled["masked"]
    return out


# The command every strategy test runs: debug=fast (6 steps, self-distillation on at step 5,
# step checkpoints every 3 steps) as 2 CPU processes with 8 examples each.
STRATEGY_RUN = ["debug=fast", "data.batch_size=8"]


def run_dir(proc) -> Path:
    """The run folder of a `train.py` call (from its last line, "metrics written to ...")."""
    return Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1]).parent


@pytest.fixture(scope="session")
def ddp_reference(cache_dir, tmp_path_factory) -> Path:
    """The run folder of `STRATEGY_RUN` under `trainer=ddp_cpu`: the reference every sharded
    strategy's weights are compared with (DDP itself equals one process on the concatenated
    batch: tests/e2e/test_ddp_parity.py). Treat as read-only."""
    from helpers import cli

    return run_dir(cli([*STRATEGY_RUN, "trainer=ddp_cpu"], cache_dir, tmp_path_factory.mktemp("ddp-reference")))


def attention_key_bias(name: str) -> bool:
    """Attention key biases: their exact gradient is zero (softmax is unchanged by adding the
    same q.b_k to every key's score), so Adam steps them on rounding noise, by up to its lr per
    step, in a direction no two reduction orders agree on. Strategy comparisons bound them by
    the summed lr instead of float noise."""
    return "k_proj.bias" in name
