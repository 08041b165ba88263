"""NaFlex preprocessing against transformers' Siglip2ImageProcessor and timm's size rule."""
from __future__ import annotations

import math
import os
import random
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from siglip2.data.naflex import (NaFlexConfig, SeqLenPlan, image_size_for_max_patches, pad_patches, patchify_image,
                                 resize_for_max_patches)


def _triples(n: int = 300):
    rng = random.Random(0)
    out = [(1, 1, 16, 256), (1, 1, 16, 1), (64, 512, 16, 256), (512, 64, 16, 256), (8, 8000, 16, 128),
           (8000, 8, 14, 1024), (4000, 3000, 16, 16384), (4096, 4096, 16, 9216), (17, 33, 8, 64)]
    for _ in range(n):
        out.append((rng.randint(1, 3000), rng.randint(1, 3000), rng.choice([8, 14, 16, 32]),
                    rng.choice([1, 16, 64, 128, 256, 576, 784, 1024, 4096, 16384])))
    return out


def _recipe_rule(h, w, p, max_patches, eps=1e-5):
    """RECIPE.md's words, written out: binary search on a scale in (eps/10, 100) to eps; each
    side max(p, p * ceil(side * scale / p)); keep the largest scale within max patches."""
    def side(s, x):
        return max(p, p * math.ceil(x * s / p))
    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, h) // p) * (side(mid, w) // p) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, h), side(lo, w)


def test_size_rule_equals_timm_and_the_recipe_formula_and_stays_finite():
    from timm.data.naflex_transforms import get_image_size_for_seq

    timm_differs = []
    for h, w, p, m in _triples():
        got = image_size_for_max_patches(h, w, p, m)
        assert got == _recipe_rule(h, w, p, m), (h, w, p, m)
        _, ref = get_image_size_for_seq((h, w), p, m)
        if tuple(ref) != got:
            timm_differs.append(((h, w, p, m), got, tuple(ref)))
        gh, gw = got[0] // p, got[1] // p
        assert got[0] % p == 0 and got[1] % p == 0 and gh >= 1 and gw >= 1
        assert gh * gw <= m or min(gh, gw) == 1, (h, w, p, m, got)  # only a 1-patch side can overshoot
        assert all(math.isfinite(v) for v in got)
    assert not timm_differs, timm_differs[:5]
    # beyond 64 patches a side (big_vision's fixed canvas gives NaN there): a real size
    h, w = image_size_for_max_patches(64, 8192, 16, 1024)
    assert (h, w) == (48, 5456) and w // 16 > 64 and (h // 16) * (w // 16) <= 1024  # 3 x 341 patches
    with pytest.raises(ValueError):
        image_size_for_max_patches(0, 10, 16, 256)


def _hf_processor(patch: int, max_patches: int):
    from transformers import Siglip2ImageProcessor

    return Siglip2ImageProcessor(patch_size=patch, max_num_patches=max_patches)


@pytest.mark.parametrize("size", [(37, 300), (300, 37), (64, 64), (129, 77), (5, 9), (400, 250)])
def test_patches_masks_and_shapes_equal_hf_processor(size):
    rng = np.random.default_rng(sum(size))
    h, w = size
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    patch, max_patches = 8, 64
    ref = _hf_processor(patch, max_patches)(images=[Image.fromarray(pixels)], return_tensors="pt")
    img = torch.from_numpy(pixels).permute(2, 0, 1)  # uint8 (C, H, W)
    resized = resize_for_max_patches(img, patch, max_patches)
    assert resized.dtype == torch.uint8
    batch = pad_patches([patchify_image(resized, patch)], seq_len=max_patches)
    ours = batch["patches"].float() / 127.5 - 1.0  # our [-1, 1] = HF's mean/std 0.5
    torch.testing.assert_close(batch["spatial_shapes"], ref["spatial_shapes"].long())
    torch.testing.assert_close(batch["patch_valid"].long(), ref["pixel_attention_mask"].long())
    # same uint8 resize (torchvision, bilinear, antialias), same normalisation: equal to float
    # rounding on the real patches (padding is masked: HF pads normalised 0, we pad pixel 0)
    valid = batch["patch_valid"]
    torch.testing.assert_close(ours[valid], ref["pixel_values"].float()[valid], atol=1e-6, rtol=0)


def test_normalised_boxes_survive_the_aspect_distorting_resize():
    """A 37 x 300 image with a filled box: the ceil stretches the sides differently, yet the box
    in normalised coordinates is where it was (within one resized pixel)."""
    img = torch.zeros(3, 37, 300, dtype=torch.uint8)
    x1, y1, x2, y2 = 60, 9, 210, 30
    img[:, y1:y2, x1:x2] = 255
    out = resize_for_max_patches(img, 16, 64)
    hh, ww = out.shape[-2:]
    assert abs(hh / ww - 37 / 300) > 0.01  # the aspect did move
    ys, xs = torch.nonzero(out[0] > 127, as_tuple=True)
    got = (xs.min() / ww, ys.min() / hh, (xs.max() + 1) / ww, (ys.max() + 1) / hh)
    want = (x1 / 300, y1 / 37, x2 / 300, y2 / 37)
    for g, t, n in zip(got, want, (ww, hh, ww, hh)):
        assert abs(float(g) - t) <= 1.0 / n + 1e-6, (got, want)


@torch.no_grad()
def test_padded_batch_gives_each_image_its_own_embedding():
    from siglip2.model import build_model

    torch.manual_seed(0)
    model = build_model(dict(name="t", embed_dim=32,
                             vision=dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4, posemb_grid=4,
                                         image_size=16),
                             text=dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10))).eval()
    images = [torch.rand(3, 12, 40), torch.rand(3, 40, 12), torch.rand(3, 20, 20)]
    items = [patchify_image(resize_for_max_patches(im, 4, 30), 4) for im in images]
    batch = pad_patches(items, seq_len=32)
    pooled = model.encode_image(patches=batch["patches"], patch_coord=batch["patch_coord"],
                                patch_valid=batch["patch_valid"], spatial_shapes=batch["spatial_shapes"]).pooled
    for i, item in enumerate(items):
        alone = pad_patches([item], seq_len=item[0].shape[0])
        one = model.encode_image(patches=alone["patches"], patch_coord=alone["patch_coord"],
                                 patch_valid=alone["patch_valid"], spatial_shapes=alone["spatial_shapes"]).pooled
        torch.testing.assert_close(pooled[i], one[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="more than the sequence length"):
        pad_patches(items, seq_len=8)


# ---------------------------------------------------------------- the batch plan
def test_plan_is_the_same_on_every_rank_and_worker():
    """2 ranks x 2 workers: worker w of a rank builds batches w, w + 2, ...; each asks its own
    plan object (built in its own process) and all agree with one reference plan."""
    cfg = NaFlexConfig(seed=7)
    reference = SeqLenPlan(cfg, batch_size=32)
    for rank in range(2):
        for worker in range(2):
            plan = SeqLenPlan(NaFlexConfig(seed=7), batch_size=32)
            for k in range(worker, 400, 2):
                assert plan(k) == reference(k), (rank, worker, k)
    other = SeqLenPlan(NaFlexConfig(seed=8), batch_size=32)
    assert [other(k) for k in range(50)] != [reference(k) for k in range(50)]  # the seed matters


def test_largest_length_halves_the_batch_for_two_steps_and_lengths_are_uniform():
    cfg = NaFlexConfig()
    plan = SeqLenPlan(cfg, batch_size=32)
    steps = [plan(k) for k in range(20000)]
    assert {b for length, b in steps if length == 1024} == {16}
    assert {b for length, b in steps if length != 1024} == {32}
    k = 0
    while k < len(steps) - 1:  # every 1024 batch comes in a pair
        if steps[k][0] == 1024:
            assert steps[k + 1] == (1024, 16)
            k += 2
        else:
            k += 1
    # slots (one per 32 examples) are uniform over the five lengths
    slots = Counter(length for length, b in steps if b == 32) + Counter(
        {1024: sum(1 for length, b in steps if length == 1024) // 2})
    total = sum(slots.values())
    for length in cfg.seq_lens:
        assert abs(slots[length] / total - 0.2) < 0.02, slots
    # mean examples per batch: 32 on plain slots, 16 on the halved ones
    first = steps[:10000]
    assert plan.examples_per_batch_mean() == pytest.approx(sum(b for _, b in first) / 10000, rel=1e-12)


def test_token_batching_keeps_the_token_budget():
    plan = SeqLenPlan(NaFlexConfig(batching="tokens", tokens_per_batch=32 * 576), batch_size=32)
    for k in range(200):
        length, b = plan(k)
        assert b == (32 * 576) // length and b * length <= 32 * 576
    with pytest.raises(ValueError, match="odd"):
        SeqLenPlan(NaFlexConfig(), batch_size=31)
    with pytest.raises(ValueError, match="batching"):
        NaFlexConfig(batching="pixels")


# ---------------------------------------------------------------- the loader and the stage
@pytest.mark.e2e
def test_two_ranks_with_two_workers_each_draw_the_same_lengths(cache_dir, monkeypatch):
    """The real loader (stage=naflex data config, 2 DataLoader workers) as rank 0 and rank 1
    of 2: batch k has the plan's length and size on both ranks, whichever worker made it."""
    from hydra.utils import instantiate

    from helpers import compose_cfg

    cfg = compose_cfg(["stage=naflex", "data.num_workers=2", "data.batches_per_epoch=6"], cache_dir, cache_dir)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        data = instantiate(cfg.data, _recursive_=False, _convert_="all")
        seen[rank] = [(b["patches"].shape[1], b["patches"].shape[0], b["worker_id"]) for b in data.train_dataloader()]
        for b_len, b_size, _ in seen[rank]:
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
    res = evaluate_all([demo.zeroshot_yaml, demo.retrieval_yaml, demo.refexp_yaml], model=model, tokenizer=tok,
                       image_size=64, batch_size=100, max_batches=1, naflex_seq_len=48, decoder=decoder)
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
    assert square["zeroshot/demo_words_square/skipped_filtered_aspect"] == yaml.safe_load(
        open(demo.words_square_yaml))["num_samples"]
    assert not any(k.endswith(("/top1", "/top5")) for k in square), sorted(square)
