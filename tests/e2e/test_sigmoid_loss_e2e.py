"""SigmoidLoss on 2 gloo processes against one process on the concatenated batch and against
open_clip's SigLipLoss(rank, world_size) (values, gradients and the nominal-batch weighting on
one process: tests/unit/test_sigmoid_loss.py)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siglip2.losses import SigmoidLoss
from test_sigmoid_loss import SigLipLoss, _direct_formula, _inputs, _leaves, _loss_and_grads


# --------------------------------------------------------------------------------------
# 2 processes (gloo) vs one process on the concatenated batch

WORLD, LOCAL_B, CHUNK = 2, 5, 3
NOMINAL = 8  # per rank: the batch of 5 is a smaller one than the run's (NaFlex halving)


def _dist_worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        x, y, t, bias = _inputs(WORLD * LOCAL_B, seed=5, scale=6.0, bias=-3.0, scale_shape=(1,))
        sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        results = {}
        for name, fn, kw in [
            ("ours", SigmoidLoss(chunk_size=CHUNK), {}),
            ("ours_plain", SigmoidLoss(chunk_size=4096), {}),
            ("ours_nominal", SigmoidLoss(chunk_size=CHUNK), {"nominal_batch_size": NOMINAL}),
            ("open_clip", SigLipLoss(rank=rank, world_size=WORLD), {}),
        ]:
            xs, ys, ts, bs = _leaves(x[sl], y[sl], t, bias)
            out = fn(xs, ys, ts, bs, **kw)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            results[name] = dict(loss=loss.detach(), gx=xs.grad, gy=ys.grad, gt=ts.grad, gb=bs.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    init_method = f"file://{tmp_path / 'init'}"
    mp.spawn(_dist_worker, args=(init_method, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x, y, t, bias = _inputs(WORLD * LOCAL_B, seed=5, scale=6.0, bias=-3.0, scale_shape=(1,))
    g_loss, (g_gx, g_gy, g_gt, g_gb) = _loss_and_grads(SigmoidLoss(chunk_size=CHUNK), x, y, t, bias)
    torch.testing.assert_close(g_loss, torch.tensor(_direct_formula(x.double(), y.double(), t, bias)).float())

    for impl in ("ours", "ours_plain"):
        # per rank, identical to open_clip's SigLipLoss(rank, world_size): value and grads
        for r in range(WORLD):
            ours, oc = ranks[r][impl], ranks[r]["open_clip"]
            for k in ("loss", "gx", "gy", "gt", "gb"):
                torch.testing.assert_close(ours[k], oc[k], rtol=1e-5, atol=1e-6, msg=f"{impl} rank{r} {k}")
        # Rank r's loss is normalised by the local batch b, the single-process loss by W*b:
        # sum_r L_r = W * L_global, i.e. the mean over ranks is the global loss.
        losses = torch.stack([ranks[r][impl]["loss"] for r in range(WORLD)])
        torch.testing.assert_close(losses.mean(), g_loss, rtol=1e-5, atol=1e-6)
        # Gradients w.r.t. each rank's own embeddings (text grads summed back from the other
        # rank through the gather) are W times the global ones; DDP's averaging divides by W.
        for r in range(WORLD):
            sl = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
            torch.testing.assert_close(ranks[r][impl]["gx"], WORLD * g_gx[sl], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ranks[r][impl]["gy"], WORLD * g_gy[sl], rtol=1e-5, atol=1e-6)
        # t and b are replicated: their per-rank grads sum to W times the global grad.
        for k, g in (("gt", g_gt), ("gb", g_gb)):
            total = sum(ranks[r][impl][k] for r in range(WORLD))
            torch.testing.assert_close(total, WORLD * g, rtol=1e-5, atol=1e-6)

    # The weighting uses the global sizes: W ranks of 5 stand for a global batch of W * 8, as one
    # process would weight its concatenated batch of 10.
    n_loss, (n_gx, _, _, n_gb) = _loss_and_grads(
        lambda *a: SigmoidLoss(chunk_size=CHUNK)(*a, nominal_batch_size=WORLD * NOMINAL), x, y, t, bias
    )
    assert not torch.allclose(n_loss, g_loss)
    losses = torch.stack([ranks[r]["ours_nominal"]["loss"] for r in range(WORLD)])
    torch.testing.assert_close(losses.mean(), n_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["ours_nominal"]["gx"], WORLD * n_gx[:LOCAL_B], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        sum(ranks[r]["ours_nominal"]["gb"] for r in range(WORLD)), WORLD * n_gb, rtol=1e-5, atol=1e-6
    )
