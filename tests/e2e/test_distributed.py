"""`siglip2.distributed`: ranks that pass different shapes to the gradient all_gather (the
sigmoid loss's) get a clear ValueError on every rank, naming each rank's shape, instead of a
C++ abort (gloo) or a hang (NCCL)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank, init_method, out_dir, sizes):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=WORLD,
        timeout=__import__("datetime").timedelta(seconds=60),
    )
    from siglip2.distributed import all_gather_with_grad
    from siglip2.losses import SigmoidLoss

    outcome = []
    try:
        # equal shapes: the gather works, and the same shape is checked again (CPU: every call)
        for _ in range(2):
            x = torch.full((3, 4), float(rank), requires_grad=True)
            outcome.append(("ok", all_gather_with_grad(x).shape[0]))
        for b in sizes[rank]:  # then the ranks' batches differ
            emb = torch.nn.functional.normalize(torch.randn(b, 4), dim=-1)
            try:
                SigmoidLoss()(emb, emb, torch.tensor(10.0), torch.tensor(-10.0))
                outcome.append(("ok", b))
            except ValueError as err:
                outcome.append(("error", str(err)))
        torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_unequal_batches_give_a_clear_error_on_every_rank(tmp_path):
    # rank 0: 5 then 3 (equal to rank 1's second batch), rank 1: 4 then 3
    ctx = mp.start_processes(
        _worker,
        args=(f"file://{tmp_path / 'init'}", str(tmp_path), {0: [5, 3], 1: [4, 3]}),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = 120  # a hang fails the test instead of stalling CI
    import time

    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the ranks hung on unequal batches")
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out[:2] == [("ok", 6), ("ok", 6)]
        kind, message = out[2]
        assert kind == "error", out
        assert "rank 0: (5, 4)" in message and "rank 1: (4, 4)" in message, message
        assert out[3] == ("ok", 3)  # the group is still usable after the refusal
