"""Fixtures shared by the end-to-end tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One `paths.cache_dir` for the whole session: the debug demo (400 samples, its
    tokenizer) is built once (~40 s) and read by every end-to-end test."""
    return tmp_path_factory.mktemp("siglip2-cache")


@pytest.fixture(scope="session")
def debug_pretrain(cache_dir, tmp_path_factory) -> Path:
    """The run folder of one `debug=fast` pretraining run (6 steps, self-distillation from
    step 5), whose hand-off checkpoints the later stages start from. Treat as read-only."""
    from test_train import compose_cfg, fit

    out = tmp_path_factory.mktemp("debug-pretrain")
    _, stage = fit(compose_cfg([], cache_dir, out))
    assert stage.loss_enabled["local_to_global"] and stage.loss_enabled["masked"]
    return out
