"""NaFlex on the demo: the real loader as two ranks with two workers each, the naflex stage
trained from the 90% checkpoint, and evaluation at a sequence length (the preprocessing against
transformers and timm: tests/unit/test_naflex.py)."""

from __future__ import annotations

import math

import pytest
import torch


# ---------------------------------------------------------------- the loader and the stage
@pytest.mark.e2e
def test_two_ranks_with_two_workers_each_draw_the_same_lengths(cache_dir, monkeypatch):
    """The real loader (stage=naflex data config, 2 DataLoader workers) as rank 0 and rank 1
    of 2: batch k has the plan's length and size on both ranks, whichever worker made it."""
    from stages.runner import build_datamodule

    from helpers import compose_cfg

    cfg = compose_cfg(["stage=naflex", "data.num_workers=2", "data.batches_per_epoch=6"], cache_dir, cache_dir)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        data = build_datamodule(cfg)
        seen[rank] = [(b["patches"].shape[1], b["patches"].shape[0], b["worker_id"]) for b in data.train_dataloader()]
        for b_len, _b_size, _ in seen[rank]:
            assert b_len in (32, 64, 144, 196, 256)
    plan = data.plan
    assert [(n, b) for n, b, _ in seen[0]] == [(n, b) for n, b, _ in seen[1]] == [plan(k) for k in range(6)]
    assert {w for _, _, w in seen[0]} == {0, 1}  # both workers made batches


@pytest.mark.e2e
def test_naflex_stage_trains_from_the_90pct_checkpoint(cache_dir, debug_pretrain, tmp_path):
    import lightning as L

    from helpers import compose_cfg, fit

    class Record(L.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append({k: batch[k].clone() for k in ("patches", "patch_valid", "spatial_shapes")})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches[-1]["negative_weight"] = float(trainer.callback_metrics["train/negative_weight"])

    ckpt = debug_pretrain / "checkpoints" / "frac_0.90.ckpt"
    record = Record()
    trainer, stage = fit(compose_cfg(["stage=naflex", f"init_from={ckpt}"], cache_dir, tmp_path), [record])
    assert set(stage.losses) == {"sigmoid", "locca"} and stage.teacher is None
    assert next(iter(trainer.datamodule.train_dataloader()))["patches"].dtype == torch.uint8  # workers: uint8
    source = torch.load(ckpt, map_location="cpu", weights_only=True)["siglip2"]
    total = source["recipe"]["examples"]
    plan = trainer.datamodule.plan
    # the stretched window: 10% of the recipe x 3.75, in batches of the plan's mean size
    assert trainer.max_steps == math.ceil(0.1 * total * 3.75 / plan.examples_per_batch_mean())
    assert trainer.global_step == trainer.max_steps == len(record.batches)
    for k, b in enumerate(record.batches):  # batch k follows the plan (one process, no workers)
        length, size = plan(k)
        # the loader's uint8 patches arrive in the step as float32 in [-1, 1] (normalised on the device)
        assert b["patches"].shape[:2] == (size, length) and b["patches"].dtype == torch.float32
        assert float(b["patches"].min()) >= -1.0 and float(b["patches"].max()) <= 1.0
        grid = b["spatial_shapes"].prod(1)
        assert torch.equal(b["patch_valid"].sum(1), grid) and bool((grid <= length).all())
        # a halved batch's negatives count as the full batch's (issue 26): (B - 1)/(B/2 - 1)
        want = 1.0 if size == plan.batch_size else (plan.batch_size - 1) / (size - 1)
        assert b["negative_weight"] == pytest.approx(want), (k, size)
    assert any(plan(k)[1] < plan.batch_size for k in range(trainer.global_step))  # the run has halved batches
    assert stage.examples_seen == sum(plan(k)[1] for k in range(trainer.global_step))
    out = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta = out["siglip2"]
    assert meta["stage"] == "naflex" and meta["init_from"]["not_in_checkpoint"] == []
    assert any(k.startswith("teacher.") for k in meta["init_from"]["ignored"])  # no distillation here
    # progress moves 1/3.75 recipe example per example trained, from the window's start
    want = min(1.0, (round(0.9 * total) + stage.examples_seen / 3.75) / total)
    assert meta["recipe"]["stretch"] == 3.75 and meta["recipe"]["progress"] == pytest.approx(want, abs=1e-9)
    for name in ("sigmoid", "locca"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss_{name}"])


def _demo_and_random_tiny_model(cache_dir):
    """The 400-sample demo, its tokenizer and a seeded random `model=tiny` in eval mode."""
    import yaml

    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.model import build_model
    from helpers import ROOT

    demo = ensure_demo(cache_dir / "demo-n400-s0", num_train=400, seed=0)
    cfg = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    tok = build_tokenizer(demo.tokenizer_path, length=cfg["text"]["max_len"])
    cfg["text"]["vocab_size"] = tok.vocab_size
    torch.manual_seed(0)
    return demo, tok, build_model(cfg).eval()


@pytest.mark.e2e
def test_naflex_evaluation_keeps_each_images_aspect_within_the_length(cache_dir):
    """eval.naflex_seq_len: the eval samples are padded patch sequences of at most L patches
    whose grid follows the image's aspect; zero-shot, retrieval and refexp run on them (the
    dense probe keeps its square view), and a random model scores near chance."""
    from siglip2.data.shards import build_eval_loader
    from siglip2.eval.suite import EvalSample, evaluate_all, load_eval_set

    demo, tok, model = _demo_and_random_tiny_model(cache_dir)
    es = load_eval_set(demo.retrieval_yaml)
    loader = build_eval_loader(es.urls, EvalSample(es, 64, naflex_seq_len=48, patch_size=8), batch_size=16)
    batch = next(iter(loader))
    assert batch["patches"].shape[1:] == (48, 8 * 8 * 3) and "image" not in batch
    shapes = batch["spatial_shapes"]
    assert bool((shapes.prod(1) <= 48).all()) and len({tuple(s) for s in shapes.tolist()}) > 1  # own aspects
    from siglip2.losses.locca import LoccaConfig, LoccaHead

    decoder = LoccaHead.for_model(LoccaConfig(), model.config).decoder.eval()  # refexp reads padded tokens
    res = evaluate_all(
        [demo.zeroshot_yaml, demo.retrieval_yaml, demo.refexp_yaml],
        model=model,
        tokenizer=tok,
        image_size=64,
        batch_size=100,
        max_batches=1,
        naflex_seq_len=48,
        decoder=decoder,
    )
    assert res["refexp/demo_refexp/num_regions"] > 0 and 0.0 <= res["refexp/demo_refexp/acc@0.5"] <= 1.0
    for key in ("zeroshot/demo_zeroshot/top1", "retrieval/demo_retrieval/image_to_text_R@5"):
        assert 0.0 <= res[key] <= 0.4, (key, res[key])  # an untrained model: near chance
    n_all = res["zeroshot/demo_zeroshot/num_images"]
    assert n_all == 100 and not any("skipped" in k for k in res), sorted(res)


def test_aspect_subset_is_counted_and_told_as_kept_n_of_m(cache_dir, caplog):
    """`eval.aspect_min` leaves out the squarer images on purpose: counted under
    `filtered_aspect`, told as one info line "kept N of M", no per-sample skip warnings; a set
    left with no image reports its count and no rate."""
    import logging

    import yaml

    from siglip2.eval.suite import evaluate_all

    demo, tok, model = _demo_and_random_tiny_model(cache_dir)
    kw = dict(model=model, tokenizer=tok, image_size=64, batch_size=500, naflex_seq_len=48)
    full = evaluate_all([demo.zeroshot_yaml], **kw)["zeroshot/demo_zeroshot/num_images"]
    with caplog.at_level(logging.INFO):
        res = evaluate_all([demo.zeroshot_yaml], aspect_min=1.6, **kw)
    kept, left = res["zeroshot/demo_zeroshot/num_images"], res["zeroshot/demo_zeroshot/skipped_filtered_aspect"]
    assert kept > 0 and left > 0 and kept + left == full, (kept, left, full)
    assert f"kept {int(kept)} of {int(full)} images" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "skipped" in r.getMessage()]
    # a set with no image that elongated (the square words): its count, no 0% rates
    square = evaluate_all([demo.words_square_yaml], aspect_min=1.6, **kw)
    assert square["zeroshot/demo_words_square/num_images"] == 0
    assert (
        square["zeroshot/demo_words_square/skipped_filtered_aspect"]
        == yaml.safe_load(open(demo.words_square_yaml))["num_samples"]
    )
    assert not any(k.endswith(("/top1", "/top5")) for k in square), sorted(square)
