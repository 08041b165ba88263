"""A DeepSpeed checkpoint directory whose optimiser file pickles more than DeepSpeed's own
records is refused by `siglip2.checkpoint.read_checkpoint` (the ZeRO-2 runs on 2 CPU processes
and their checkpoints: tests/e2e/test_deepspeed.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")


def test_checkpoint_directory_with_other_pickled_code_is_refused(tmp_path):
    """An optimiser file that pickles anything beyond DeepSpeed's three records is refused, and
    what its pickle would have run does not run."""
    from siglip2.checkpoint import read_checkpoint

    planted = tmp_path / "planted.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(planted), "w"))

    tag = tmp_path / "last.ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    (tmp_path / "last.ckpt" / "latest").write_text("checkpoint")
    torch.save(
        {
            "module": {"w": torch.zeros(2)},
            "param_shapes": [{"w": torch.Size([2])}],
            "buffer_names": [],
            "siglip2": {"model": {}},
        },
        tag / "mp_rank_00_model_states.pt",
    )
    torch.save(
        {
            "optimizer_state_dict": {
                "zero_stage": 2,
                "partition_count": 1,
                "x": Payload(),
                "single_partition_of_fp32_groups": [torch.zeros(2)],
            }
        },
        tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(str(tmp_path / "last.ckpt"))
    assert not planted.exists()
