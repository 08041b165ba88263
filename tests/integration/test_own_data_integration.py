"""Your own shards' tokenizer meets a checkpoint without a tokenizer record: init_from names both
vocabulary sizes (the shards and the tokenizer: tests/unit/test_own_data.py)."""

from __future__ import annotations

import pytest
import torch

from test_own_data import shard_tokenizer  # noqa: F401 (a fixture)


def test_init_from_weights_of_another_vocabulary_size_names_both(shard_tokenizer, cache_dir, debug_pretrain, tmp_path):
    """A checkpoint that records no tokenizer (older, or converted) with another vocabulary
    size than this run's tokenizer: a clear error at init_from, not a shape mismatch inside."""
    from stages.runner import build
    from helpers import compose_cfg

    _, summary = shard_tokenizer
    raw = torch.load(debug_pretrain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    raw["siglip2"]["tokenizer"] = None
    torch.save(raw, tmp_path / "no_record.ckpt")
    vocab = raw["siglip2"]["model"]["text"]["vocab_size"]
    with pytest.raises(
        ValueError, match=f"vocabulary of {vocab} tokens but this run's tokenizer .* has {summary['vocab_size']}"
    ):
        build(
            compose_cfg(
                [f"init_from={tmp_path / 'no_record.ckpt'}", f"tokenizer.path={summary['path']}"], cache_dir, tmp_path
            )
        )
