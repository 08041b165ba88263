"""2-process DDP (CPU, gloo) computes what one process computes on the concatenated batch.

One real training batch of 2B rows (from the data module's train loader) is run through the
pretraining stage twice:

* reference: one process, `stage.training_step(batch, 0)` on all 2B rows, then backward;
* DDP: two processes (gloo, file init), each builds the stage from the same seed (asserted:
  identical weights *before* DDP's broadcast, which would hide a difference), wraps it in
  `DistributedDataParallel` the way Lightning's DDP strategy does (a module whose forward
  calls `training_step`, `find_unused_parameters=False` as in conf/trainer/ddp_cpu.yaml) and
  runs rows r*B:(r+1)*B on rank r, then backward (DDP averages the gradients).

Compared:

* every loss (`sigmoid`, `locca`) and the weighted total: the *mean over ranks* of the
  per-rank values equals the reference. Per rank, the sigmoid loss is open_clip's convention
  (rank r's images against all gathered texts, divided by the local B), so a single rank's
  value is not the global loss; their mean is (and so is the mean DDP's gradient averaging
  differentiates). LocCa is a per-sequence-normalised mean over a rank's valid sequences; the
  mean of the per-rank means is the global mean when both halves hold the same number of
  valid sequences per task, which is asserted on the batch (the demo's samples all carry
  regions, so every row has all three tasks).
* the loss-like metrics that are means of the same kind (sigmoid pos/neg logit, logit
  scale/bias; LocCa per-task losses). Token accuracies (`locca/*_acc`) are left out: they are
  ratios over per-rank token counts, which differ between the halves.
* every parameter's gradient after DDP's averaging (both ranks hold the same; checked), which
  covers the sigmoid loss's differentiable all-gather: without the gradient of the other
  ranks' losses w.r.t. a rank's text embeddings, or with the world size in the wrong place,
  the text tower's and the logit scale/bias gradients would differ.

Weights: the stage's init plus seeded N(0, 0.02^2) noise on every parameter, the same in
every process. At init the LocCa decoder's vocabulary projection is zero, so LocCa is exactly
log V on every row and sends no gradient into the decoder body or the image tower; off the
init point every loss and every gradient path is non-trivial (checked on the reference).
The logit bias starts at -2 (`model.logit_bias_init`), not SigLIP's -10, so that the
negative pairs, the only pairs the all-gather adds across ranks, carry a real share of the
gradient.

Self-distillation (cases `distill`, DINO centring, and `distill_sk`, Sinkhorn-Knopp): both
losses are switched on as at 80% (`enable_loss`: heads re-initialised, teacher copied from
the student), then the same noise moves student, teacher, heads and mask token. The views are
drawn per (seed, step, rank) in training, so here they are cut once for the whole batch and
injected (rank r gets its rows; local views are view-major). Compared besides losses and
gradients: the teacher entropies and the centres after the step, which only agree if the
centre's mean (and Sinkhorn-Knopp's sums) are all-reduced: with a rank-local mean the test
fails on the centre.

Excluded, and why: LocCa's parallel prediction draws per-row coin flips from a generator
seeded by (seed, step, rank), so two ranks cannot draw what one process draws for the same
rows; the test sets `stage.losses.locca.parallel_prob=0`, which removes the only draw inside
the step (task targets are drawn in the data pipeline and are fixed in the saved batch; the
tiny model has no dropout). Both the plain sigmoid path (chunk 4096 > batch) and the chunked
autograd path (chunk 3: tiles straddle the rank blocks) are run.

Tolerance: rtol 1e-4, atol 1e-6 (float32), elementwise (`torch.allclose`) on every gradient
tensor and on each loss. The two runs add the same terms in different orders (matmuls over 4
vs 8 rows, the gloo all-reduce's sum, per-rank partial sums, 1 vs 2 threads): measured, the
losses move by <= 1e-6 absolute (~1e-7 relative), each gradient tensor by ~2e-6 of its norm,
and no element uses more than a quarter of its allowance. A real error is orders larger: a
gather whose backward keeps only the local gradient leaves the text tower's gradients at
1/3-1/2 of their norm, a loss off by the world size is off by 2x. The atol covers elements that are ~0 (the
attention key biases' gradient is zero in exact arithmetic).

Not checked here: what Lightning *logs*. `training_step` logs `train/loss*` with
`sync_dist=True`, i.e. the mean over ranks compared here.

Data: the debug=fast demo (400 train samples plus full eval sets and tokenizer training)
takes ~40 s to build on 2 cores, so the data module reads a tiny demo (32 train samples, same
generator, its own tokenizer) through `data.train=...` / `tokenizer.path=...` with
`data.demo=null`; everything else is `debug=fast`.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
]  # no Trainer here

WORLD = 2
PER_RANK = 4  # B; the reference runs 2B = 8 rows
RTOL, ATOL = 1e-4, 1e-6
# Sigmoid chunk size and, for the distillation cases, the teacher-side target rule: the plain
# path (4096 > 8 rows), the tiled autograd Function, and all four losses with DINO centring
# and with Sinkhorn-Knopp (both all-reduce over ranks).
CASES = {
    "plain": (4096, None),
    "chunked": (3, None),
    "distill": (4096, "centering"),
    "distill_sk": (4096, "sinkhorn_knopp"),
}
DISTILL = ("local_to_global", "masked")
VIEW_SEED = 77
PERTURB_SEED, PERTURB_STD = 1234, 0.02
# Metrics whose mean over ranks is the global value (see module docstring).
METRICS = (
    "pos_logit",
    "neg_logit",
    "logit_scale",
    "logit_bias",
    "locca/cap",
    "locca/aref",
    "locca/gcap",
    "locca/loss",
    "distill/local_to_global",
    "distill/masked",
    "distill/l2g/teacher_entropy",
    "distill/masked/teacher_entropy",
    "distill/l2g/center_entropy",
    "distill/masked/center_entropy",
)


# ---- shared by the reference and the ranks ---------------------------------------------
def _build_stage(spec: dict[str, Any], case: str):
    from stages.runner import build_stage

    chunk, centering = CASES[case]
    cfg = OmegaConf.create(spec["cfg"])
    cfg.stage.losses.sigmoid.chunk_size = chunk
    if centering is None:  # sigmoid + LocCa only
        for name in DISTILL:
            del cfg.stage.losses[name]
    else:
        for name in DISTILL:
            cfg.stage.losses[name].centering = centering
    torch.manual_seed(int(cfg.seed))
    stage = build_stage(cfg, vocab_size=spec["vocab_size"])
    if centering is not None:  # the switch, as at 80%: heads re-initialised, teacher = student
        for name in DISTILL:
            stage.enable_loss(name)
    # Off the init point (see module docstring): the same seeded noise in every process. It
    # lands on the teacher too (teacher != student, as after some EMA steps) and on the
    # zero-initialised mask token.
    noise = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn(p.shape, generator=noise), alpha=PERTURB_STD)
    stage.train()
    return stage


def _with_views(stage, views) -> None:
    """Every step context of `stage` uses these views instead of drawing its own (the draw is
    seeded per rank, so two ranks cannot cut what one process cuts for the same rows)."""
    context = stage.context

    def context_with_views(batch):
        ctx = context(batch)
        ctx.__dict__["views"] = views  # fills the cached_property
        return ctx

    stage.context = context_with_views


def _rank_views(views, rank: int):
    """Rank `rank`'s rows of views cut for the whole batch (local views are view-major)."""
    lo, hi = rank * PER_RANK, (rank + 1) * PER_RANK
    n = WORLD * PER_RANK

    def local(t):
        return t.unflatten(0, (t.shape[0] // n, n))[:, lo:hi].flatten(0, 1)

    return type(views)(
        views.global_view[lo:hi],
        local(views.local_views),
        views.mask[lo:hi],
        views.global_boxes[lo:hi],
        local(views.local_boxes),
        views.global_flip[lo:hi],
        local(views.local_flip),
    )


def _centers(stage) -> dict[str, torch.Tensor]:
    """The distillation losses' centres after the step (updated with the all-reduced mean)."""
    return {name: stage.losses[name].target.center.clone() for name in DISTILL if name in stage.losses}


def _recording(stage) -> dict[str, Any]:
    """Keep what `compute_losses` returns inside `training_step` ({name: (loss, metrics)})."""
    seen: dict[str, Any] = {}
    compute = stage.compute_losses

    def compute_and_keep(batch):
        out = compute(batch)
        seen.update(out)
        return out

    stage.compute_losses = compute_and_keep
    return seen


def _summary(seen: dict[str, Any], total: torch.Tensor) -> dict[str, float]:
    out = {"total": float(total.detach())}
    for name, (loss, metrics) in seen.items():
        out[f"loss/{name}"] = float(loss.detach())
        out.update({k: float(v) for k, v in metrics.items() if k in METRICS})
    return out


def _rows(batch: dict[str, Any], lo: int, hi: int, n: int) -> dict[str, Any]:
    """Rows lo:hi of every per-row tensor or list in the batch; other entries as they are."""
    out = {}
    for key, value in batch.items():
        if (torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == n) or (
            isinstance(value, list) and len(value) == n
        ):
            out[key] = value[lo:hi]
        else:
            out[key] = value
    return out


class _TrainingStep(nn.Module):
    """What Lightning's DDP strategy wraps: forward is the LightningModule's training_step."""

    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, batch):
        return self.stage.training_step(batch, 0)


def _rank_main(rank: int, work: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{work}/pg", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        spec = torch.load(f"{work}/spec.pt", weights_only=False)
        n = spec["n"]
        batch = _rows(spec["batch"], rank * PER_RANK, (rank + 1) * PER_RANK, n)
        result = {}
        for case in CASES:
            stage = _build_stage(spec, case)
            if CASES[case][1] is not None:
                _with_views(stage, _rank_views(spec["views"], rank))
            init = spec["init"][case]
            for key, value in stage.state_dict().items():  # same weights before DDP broadcasts rank 0's
                assert torch.equal(value, init[key]), f"rank {rank}, {case}: {key} differs from the reference init"
            seen = _recording(stage)
            ddp = nn.parallel.DistributedDataParallel(_TrainingStep(stage), find_unused_parameters=False)
            total = ddp(batch)
            total.backward()
            grads = {name: p.grad.detach().clone() for name, p in stage.named_parameters() if p.grad is not None}
            result[case] = {"values": _summary(seen, total), "grads": grads, "centers": _centers(stage)}
        torch.save(result, f"{work}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(work: Path, timeout: float = 240.0) -> None:
    ctx = mp.start_processes(_rank_main, args=(str(work),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):  # raises a rank's error
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP ranks did not finish within {timeout:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


# ---- the test ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from siglip2.data.demo import ensure_demo

    return ensure_demo(
        tmp_path_factory.mktemp("ddp-demo") / "root",
        num_train=32,
        seed=0,
        workers=1,
        num_zeroshot=8,
        num_retrieval=8,
        num_refexp=8,
        num_segmentation=8,
        num_words=8,
    )


def _compose(demo, tmp_path: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "debug=fast",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path}",
                f"paths.root_dir={tmp_path}",
                "data.demo=null",
                f'data.train="{demo.train_urls}"',
                f"tokenizer.path={demo.tokenizer_path}",
                f"data.batch_size={WORLD * PER_RANK}",
                "stage.losses.locca.parallel_prob=0",
                # b = -2 instead of -10: the negatives' sigmoid is ~e^b, so at -10 the cross-rank
                # negatives (all the all-gather adds) hold ~1e-3 of the gradient; at -2 they count.
                "model.logit_bias_init=-2.0",
            ],
        )


def test_ddp_two_ranks_match_one_process_on_the_whole_batch(tiny_demo, tmp_path):
    from stages.runner import build_datamodule

    cfg = _compose(tiny_demo, tmp_path)
    datamodule = build_datamodule(cfg)
    from siglip2.data.transforms import normalize_pixels

    batch = normalize_pixels(next(iter(datamodule.train_dataloader())))  # what the device hook gives the step
    n = WORLD * PER_RANK
    assert batch["image"].shape[0] == n
    # LocCa's per-rank per-sequence mean averages to the global mean only with equal counts.
    for task in ("cap", "aref", "gcap"):
        valid = batch[f"locca_{task}_valid"].bool()
        counts = [int(valid[r * PER_RANK : (r + 1) * PER_RANK].sum()) for r in range(WORLD)]
        assert len(set(counts)) == 1 and counts[0] > 0, f"{task}: valid rows per rank {counts}"

    spec = {
        "cfg": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("stage", "model", "optim")},
        "vocab_size": int(datamodule.tokenizer.vocab_size),
        "batch": batch,
        "n": n,
        "init": {},
    }
    spec["cfg"]["seed"] = int(cfg.seed)

    reference = {}
    for case in CASES:
        stage = _build_stage(spec, case)
        distill = CASES[case][1] is not None
        if distill:  # views of the whole batch, cut once; each rank gets its rows
            if "views" not in spec:
                from siglip2.data.views import make_views

                spec["views"] = make_views(
                    batch["image"],
                    torch.Generator().manual_seed(VIEW_SEED),
                    stage.views,
                    patch_size=stage.model.config.vision.patch_size,
                )
            _with_views(stage, spec["views"])
        spec["init"][case] = {k: v.detach().clone() for k, v in stage.state_dict().items()}
        seen = _recording(stage)
        total = stage.training_step(batch, 0)  # no Trainer needed: self.log warns and returns
        assert set(seen) == {"sigmoid", "locca", *(DISTILL if distill else ())}, sorted(seen)
        total.backward()
        grads = {name: p.grad.detach().clone() for name, p in stage.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        dead = [
            name
            for name, g in grads.items()  # key biases: zero gradient in exact arithmetic
            if name.startswith("losses.") and not name.endswith("k_proj.bias") and not g.any()
        ]
        assert not dead, f"{case}: LocCa parameters without a gradient, nothing to compare: {dead}"
        reference[case] = {"values": _summary(seen, total), "grads": grads, "centers": _centers(stage)}
    torch.save(spec, tmp_path / "spec.pt")

    _spawn(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for case in CASES:  # printed as it goes: pytest shows it with a failure (or with -s)
        ref = reference[case]
        got = [r[case] for r in ranks]
        # Losses and metrics: mean over ranks vs the single process.
        for key, want in ref["values"].items():
            per_rank = [g["values"][key] for g in got]
            mean = sum(per_rank) / WORLD
            print(f"{case} {key}: ref {want:.7g}, ranks {per_rank}, |mean - ref| {abs(mean - want):.2e}")
            assert abs(mean - want) <= ATOL + RTOL * abs(want), f"{case} {key}: ranks {per_rank}, mean {mean} vs {want}"
        # Gradients: DDP leaves the same average on every rank; it must be the reference's.
        assert got[0]["grads"].keys() == ref["grads"].keys(), (
            f"{case}: parameters without a DDP gradient: {sorted(set(ref['grads']) - set(got[0]['grads']))}"
        )
        bad, worst_abs, worst_norm, worst_share = [], 0.0, 0.0, 0.0
        for name, want in ref["grads"].items():
            g0, g1 = got[0]["grads"][name], got[1]["grads"][name]
            assert torch.equal(g0, g1), f"{case} {name}: ranks hold different gradients after DDP"
            diff = (g0 - want).abs()
            worst_abs = max(worst_abs, float(diff.max()))
            if float(want.norm()) > 1e-6:  # attention key biases: zero gradient in exact arithmetic
                worst_norm = max(worst_norm, float(diff.norm() / want.norm()))
            worst_share = max(worst_share, float((diff / (ATOL + RTOL * want.abs())).max()))  # <= 1 passes
            if not torch.allclose(g0, want, rtol=RTOL, atol=ATOL):
                scale = float(g0.norm() / want.norm()) if float(want.norm()) > 0 else float("nan")
                bad.append(f"{name}: max |diff| {float(diff.max()):.3g}, |ddp|/|ref| = {scale:.4g}")
        print(
            f"{case} grads: max |diff| {worst_abs:.2e}, max |diff|/|ref| (norms, per tensor) {worst_norm:.2e}, "
            f"max |diff| / (atol + rtol |ref|) {worst_share:.2f}"
        )
        assert not bad, f"{case}: {len(bad)} of {len(ref['grads'])} gradients differ:\n  " + "\n  ".join(bad[:40])
        # Centres: updated from the all-reduced mean of the teacher logits, the same everywhere.
        for name, want in ref["centers"].items():
            assert want.abs().sum() > 0 or CASES[case][1] != "centering", f"{case} {name}: centre never moved"
            for g in got:
                assert torch.allclose(g["centers"][name], want, rtol=RTOL, atol=ATOL), f"{case} {name}: centre differs"
