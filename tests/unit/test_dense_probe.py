"""Dense-feature probe (siglip2/eval/dense_probe.py): its mIoU against torchmetrics and a hand
count, a probe that learns when the tokens carry the labels and stays at chance when they do
not (the demo's segmentation set end to end through `evaluate_all`:
tests/integration/test_dense_probe_integration.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siglip2.eval import dense_probe as dp


# -- the metric -------------------------------------------------------------------------------


def test_miou_hand_computed_with_an_absent_class():
    # 4 classes; class 3 is neither labelled nor predicted (absent: left out of the mean);
    # class 2 is predicted but never labelled (IoU 0, counted); one pixel is unlabelled.
    target = torch.tensor([0, 0, 0, 1, 1, 1, dp.IGNORE])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    cm = dp.confusion_matrix(pred, target, num_classes=4)
    assert cm.sum() == 6  # the ignored pixel is not counted, whatever was predicted there
    iou = dp.iou_per_class(cm)
    # class 0: TP 2, FP 0, FN 1 -> 2/3; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: 0/1
    assert iou[:3].tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert math.isnan(iou[3])
    assert dp.mean_iou(cm) == pytest.approx((2 / 3 + 1 / 2 + 0.0) / 3)
    assert math.isnan(dp.mean_iou(torch.zeros(3, 3, dtype=torch.long)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_torchmetrics_macro_jaccard(seed):
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(seed)
    c = 6
    target = torch.randint(0, c - 1, (5, 17, 23), generator=g)  # class 5 never labelled ...
    pred = torch.randint(0, c - 2, (5, 17, 23), generator=g)  # ... nor predicted: absent
    pred[0, 0, :4] = 4  # class 4 labelled, predicted a little
    target[1, 2, :5] = dp.IGNORE
    metric = MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=dp.IGNORE)
    ours = dp.mean_iou(dp.confusion_matrix(pred, target, c))
    assert ours == pytest.approx(float(metric(pred, target)), abs=1e-6)
    per_class = MulticlassJaccardIndex(num_classes=c, average="none", ignore_index=dp.IGNORE)(pred, target)
    iou = dp.iou_per_class(dp.confusion_matrix(pred, target, c))
    torch.testing.assert_close(iou[:5].float(), per_class[:5], atol=1e-6, rtol=0)
    assert math.isnan(iou[5])


def test_upsampling_is_bilinear_align_corners_false():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    ref = F.interpolate(x, size=(32, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dp.upsample_logits(x, (32, 24)), ref)


def test_labels_from_mask_background_and_ignore_rules():
    mask = np.array([[0, 1, 3], [4, 200, 2]], dtype=np.uint8)
    with_bg = dp.labels_from_mask(mask, num_foreground=3, background=True)
    assert with_bg.tolist() == [[0, 1, 3], [dp.IGNORE, dp.IGNORE, 2]]
    no_bg = dp.labels_from_mask(mask, num_foreground=3, background=False)  # ADE20k: 0 = unlabelled
    assert no_bg.tolist() == [[dp.IGNORE, 0, 2], [dp.IGNORE, dp.IGNORE, 1]]
    assert dp.resize_labels(torch.tensor([[0, 1], [2, 3]]), (4, 4)).tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [2, 2, 3, 3],
    ]


def test_token_grid_and_split_rule():
    assert dp.token_grid(64, 64, 64) == (8, 8)
    assert dp.token_grid(8 * 12, 128, 192) == (8, 12)
    assert dp.token_grid(27 * 27, 384, 384) == (27, 27)  # So400m/14 at 384 px: the last 6 px unseen
    with pytest.raises(ValueError):
        dp.token_grid(63, 64, 64)
    keys = [f"{i:09d}" for i in range(2000)]
    train = [dp.is_train_key(k) for k in keys]
    assert 0.45 < sum(train) / len(train) < 0.55
    assert train == [dp.is_train_key(k) for k in keys]  # a function of the key alone


# -- the probe learns, and can fail -----------------------------------------------------------


def _synthetic(n, grid, patch, num_classes, width, informative, seed, block=2):
    """Images made of regions of block x block patches, one class each (labels at pixel
    resolution, `patch` pixels per token); a token is its class's embedding + noise
    (informative) or noise alone. Regions span 2 x 2 patches because a class change at every
    patch edge caps even a perfect patch classifier near 0.82 pixel mIoU under bilinear
    upsampling (a pixel near a corner is outvoted by two neighbours of one other class)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_classes, width, generator=torch.Generator().manual_seed(123))
    cls = torch.randint(0, num_classes, (n, grid // block, grid // block), generator=g)
    cls = cls.repeat_interleave(block, 1).repeat_interleave(block, 2)
    noise = torch.randn(n, grid * grid, width, generator=g)
    tokens = noise + (emb[cls.reshape(n, -1)] if informative else 0.0)
    labels = cls.repeat_interleave(patch, 1).repeat_interleave(patch, 2).to(torch.uint8)
    return tokens, labels


@pytest.mark.parametrize("informative", [True, False])
def test_probe_learns_from_informative_tokens_and_not_from_noise(informative):
    c, grid, patch, width = 5, 8, 4, 32
    cfg = dp.DenseProbeConfig(steps=150, batch_images=16)
    tr_tok, tr_lab = _synthetic(64, grid, patch, c, width, informative, seed=0)
    te_tok, te_lab = _synthetic(32, grid, patch, c, width, informative, seed=1)
    probe = dp.train_probe(tr_tok, tr_lab, (grid, grid), c, cfg)
    miou = dp.mean_iou(dp.score_probe(probe, te_tok, (grid, grid), list(te_lab), c))
    if informative:
        assert miou > 0.9, miou
    else:
        # chance: random guesses over 5 balanced classes give IoU 1/9 each, a constant guess 1/5 / 5
        assert miou < 0.25, miou


def test_probe_is_deterministic_and_seeded():
    tok, lab = _synthetic(24, 4, 2, 3, 8, True, seed=0, block=1)
    a = dp.train_probe(tok, lab, (4, 4), 3, dp.DenseProbeConfig(steps=20, batch_images=5, seed=0))
    b = dp.train_probe(tok, lab, (4, 4), 3, dp.DenseProbeConfig(steps=20, batch_images=5, seed=0))
    c = dp.train_probe(tok, lab, (4, 4), 3, dp.DenseProbeConfig(steps=20, batch_images=5, seed=1))
    torch.testing.assert_close(a.linear.weight, b.linear.weight, atol=0, rtol=0)
    assert not torch.equal(a.linear.weight, c.linear.weight)
    with pytest.raises(ValueError, match="unknown dense probe option"):
        dp.DenseProbeConfig.from_dict({"step": 3})
