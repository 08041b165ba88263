"""Fixtures shared by the end-to-end tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One `paths.cache_dir` for the whole session: the debug demo (400 samples, its
    tokenizer) is built once (~40 s) and read by every end-to-end test."""
    return tmp_path_factory.mktemp("siglip2-cache")
