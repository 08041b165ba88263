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

from siglip2.data.naflex import (
    NaFlexConfig,
    SeqLenPlan,
    image_size_for_max_patches,
    pad_patches,
    patchify_image,
    resize_for_max_patches,
)


def _triples(n: int = 300):
    rng = random.Random(0)
    out = [
        (1, 1, 16, 256),
        (1, 1, 16, 1),
        (64, 512, 16, 256),
        (512, 64, 16, 256),
        (8, 8000, 16, 128),
        (8000, 8, 14, 1024),
        (4000, 3000, 16, 16384),
        (4096, 4096, 16, 9216),
        (17, 33, 8, 64),
    ]
    for _ in range(n):
        out.append(
            (
                rng.randint(1, 3000),
                rng.randint(1, 3000),
                rng.choice([8, 14, 16, 32]),
                rng.choice([1, 16, 64, 128, 256, 576, 784, 1024, 4096, 16384]),
            )
        )
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
    model = build_model(
        dict(
            name="t",
            embed_dim=32,
            vision=dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4, posemb_grid=4, image_size=16),
            text=dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10),
        )
    ).eval()
    images = [torch.rand(3, 12, 40), torch.rand(3, 40, 12), torch.rand(3, 20, 20)]
    items = [patchify_image(resize_for_max_patches(im, 4, 30), 4) for im in images]
    batch = pad_patches(items, seq_len=32)
    pooled = model.encode_image(
        patches=batch["patches"],
        patch_coord=batch["patch_coord"],
        patch_valid=batch["patch_valid"],
        spatial_shapes=batch["spatial_shapes"],
    ).pooled
    for i, item in enumerate(items):
        alone = pad_patches([item], seq_len=item[0].shape[0])
        one = model.encode_image(
            patches=alone["patches"],
            patch_coord=alone["patch_coord"],
            patch_valid=alone["patch_valid"],
            spatial_shapes=alone["spatial_shapes"],
        ).pooled
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
        {1024: sum(1 for length, b in steps if length == 1024) // 2}
    )
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
