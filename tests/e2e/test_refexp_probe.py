"""The refexp probe (`siglip2.eval.refexp_probe`, the paper's Table 5 protocol) must learn a
task it can learn, and give the same answer on 2 gloo ranks, one of them with no image (a set
of fewer shards than ranks), as on one process."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siglip2.eval.refexp_probe import RefexpProbeConfig

BOXES = [[0.1, 0.1, 0.4, 0.4], [0.6, 0.1, 0.9, 0.4], [0.1, 0.6, 0.4, 0.9], [0.55, 0.55, 0.95, 0.95]]
CFG = dict(steps=300, batch_size=32, lr=3e-3, width=32, depth=1, heads=2, mlp_dim=64)


def _model():
    text = SimpleNamespace(max_len=40, width=32, depth=2, heads=2, mlp_dim=64)
    return SimpleNamespace(config=SimpleNamespace(text=text, vision=SimpleNamespace(width=16)))


def _rows(n: int = 96):
    """Image tokens that say which of 4 boxes holds the object: one random pattern per box."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(4, 4, 16, generator=g)
    rows = []
    for i in range(n):
        k = i % 4
        rows.append(
            {
                "key": f"{i:06d}",
                "tokens": patterns[k] + 0.05 * torch.randn(4, 16, generator=g),
                "token_mask": None,
                "regions": [{"caption": "the object", "box": BOXES[k]}],
            }
        )
    return rows


def _probe(rows, tokenizer_path):
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.eval.refexp_probe import run_refexp_probe

    torch.set_num_threads(1)  # as the spawned ranks: the same float sums
    tok = build_tokenizer(tokenizer_path, length=40)
    return run_refexp_probe(_model(), rows, tok, "cpu", RefexpProbeConfig(**CFG))


def _worker(rank, init_method, out_dir, tokenizer_path):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=120)
    )
    try:
        torch.save(_probe(_rows() if rank == 0 else [], tokenizer_path), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_probe_learns_boxes_the_tokens_give_and_two_ranks_agree_with_one(cache_dir, tmp_path):
    from siglip2.data.demo import ensure_demo

    path = str(ensure_demo(str(cache_dir / "demo-n400-s0"), num_train=400, seed=0).tokenizer_path)
    one = _probe(_rows(), path)
    # 4 boxes, balanced: a constant box scores 25%; the tokens name the box, so the probe reads it
    assert one["probe_acc@0.5"] > 0.9, one
    assert one["probe_num_train_regions"] + one["probe_num_test_regions"] == 96
    ctx = mp.start_processes(
        _worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path), path), nprocs=2, join=False, start_method="spawn"
    )
    import time

    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > 300:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the probe's collectives hung with an empty rank")
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == one, rank
