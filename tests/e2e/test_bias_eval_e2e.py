"""Fairness evaluations (issue 30) on 2 gloo ranks: the three new tasks through the eval suite
give the one-process numbers (the measures, the sets and the stand-in model whose numbers follow
from the construction: tests/unit/test_bias_eval.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_bias_eval import _evaluate, write_sets


# -- 2 gloo ranks give the one-process numbers ------------------------------------------------


def _worker(rank, init_method, out_dir, root):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=120)
    )
    try:
        root = Path(root)
        res = _evaluate(
            {
                "fewshot": root / "fewshot" / "set.yaml",
                "rep": root / "rep" / "set.yaml",
                "assoc": root / "assoc" / "set.yaml",
            }
        )
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_one_process_numbers(tmp_path):
    """Each rank reads its own shards (the few-shot set has one shard: rank 1 reads none of it
    and still joins the gathers); counts are summed and embeddings gathered before computing."""
    write_sets(tmp_path / "sets")
    torch.set_num_threads(1)
    one = _evaluate(
        {
            "fewshot": tmp_path / "sets" / "fewshot" / "set.yaml",
            "rep": tmp_path / "sets" / "rep" / "set.yaml",
            "assoc": tmp_path / "sets" / "assoc" / "set.yaml",
        }
    )
    ctx = mp.start_processes(
        _worker,
        args=(f"file://{tmp_path / 'init'}", str(tmp_path), str(tmp_path / "sets")),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > 300:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the ranks hung")
    numbers = {k: v for k, v in one.items() if not k.startswith("_")}
    assert numbers["fewshot/colours_fewshot/num_images"] == 150
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert {k: v for k, v in got.items() if not k.startswith("_")} == pytest.approx(numbers, abs=1e-9), rank
        assert got["_tables"] == one["_tables"]
