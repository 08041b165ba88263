"""Few-shot linear probe (`siglip2.eval.fewshot`, big_vision's `evaluators/fewshot_lsr.py`):
the closed form against numpy's least squares on the augmented system, the draw of the shots
and the split against the protocol written out again, a planted task it must solve and random
labels it must not."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siglip2.eval import fewshot as fs


def _reference_weights(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float):
    """big_vision's recipe in numpy: whiten with the examples' mean / population std + 1e-5,
    append a constant 100, targets 2 * one_hot - 1, and the ridge solution found by lstsq on
    [X; sqrt(l2) I] W = [Y; 0] (no normal equations)."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    aug = lambda a: np.hstack([(a - mean) / std, np.full((len(a), 1), 100.0)])
    xa = aug(x)
    target = 2.0 * np.eye(num_classes)[y] - 1.0
    d = xa.shape[1]
    w = np.linalg.lstsq(
        np.vstack([xa, math.sqrt(l2) * np.eye(d)]), np.vstack([target, np.zeros((d, num_classes))]), rcond=None
    )[0]
    return w, aug


@pytest.mark.parametrize(
    "n, d, l2", [(40, 6, 1.0), (40, 6, 2.0**10), (7, 16, 1.0), (7, 16, 2.0**10), (16, 15, 3.0)]
)  # primal (N >= D + 1), dual (N < D + 1), the edge
def test_closed_form_matches_lstsq_on_the_augmented_system(n, d, l2):
    g = np.random.default_rng(n * 100 + d)
    c = 4
    x = g.normal(size=(n, d)) * g.uniform(0.1, 3.0, size=d) + g.normal(size=d)  # scales and offsets to whiten
    y = np.arange(n) % c
    probe = fs.fit_lsr(torch.tensor(x, dtype=torch.float32), torch.tensor(y), c, l2)
    w_ref, aug = _reference_weights(x.astype(np.float32).astype(np.float64), y, c, l2)
    assert probe.weight.shape == (d + 1, c)
    np.testing.assert_allclose(probe.weight.numpy(), w_ref, atol=1e-4 * max(1.0, np.abs(w_ref).max()), rtol=0)
    test = g.normal(size=(50, d)).astype(np.float32)
    scores = aug(test.astype(np.float64)) @ w_ref
    np.testing.assert_allclose(probe.scores(torch.tensor(test)).numpy(), scores, atol=1e-4, rtol=0)
    assert probe.predict(torch.tensor(test)).tolist() == scores.argmax(1).tolist()


def test_fit_refuses_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        fs.fit_lsr(x, torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="l2_reg"):
        fs.fit_lsr(x, torch.tensor([0, 1, 2, 0]), 3, l2_reg=0.0)
    with pytest.raises(ValueError, match="N >= 1"):
        fs.fit_lsr(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3)


def test_draw_is_numpys_per_class_permutation_nested_over_shot_counts():
    labels = np.array([0, 1, 2, 0, 1, 0, 0, 2, 1, 0])  # class 2 has 2 examples
    draw = fs.draw_shots(labels, 3, (1, 3), seed=7)
    rng = np.random.default_rng(7)
    perms = [rng.permutation(np.where(labels == c)[0]) for c in range(3)]
    assert draw[1].tolist() == [p[0] for p in perms]
    assert draw[3].tolist() == [i for p in perms for i in p[:3]]  # class 2 gives the 2 it has
    assert sorted(labels[draw[3]].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert set(draw[1]) <= set(draw[3])  # within a seed the larger draw contains the smaller
    assert fs.draw_shots(labels, 3, (3,), seed=8)[3].tolist() != draw[3].tolist()


def _clusters(n, num_classes, dim, spread, seed, informative=True):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = spread * torch.randn(n, dim, generator=g) + (centres[y] if informative else 0.0)
    return F.normalize(x, dim=-1), y


def test_run_fewshot_matches_the_protocol_written_out_again():
    """Keys shuffled and split by crc32, the pool sorted by key, seeds 0..S-1, numpy's draw,
    lstsq: mean and population std per shot count to 1e-4, the counts exact."""
    c, shots, seeds, l2 = 5, (1, 3, 8), 4, 2.0**10
    x, y = _clusters(400, c, 24, spread=0.9, seed=0)  # overlapping: accuracies between chance and 1
    rng = np.random.default_rng(1)
    keys = [f"{k:08x}" for k in rng.permutation(10**6)[:400]]
    res = fs.run_fewshot(x, y, keys, c, shots, seeds, l2)

    order = sorted(range(400), key=lambda i: keys[i])
    train = [zlib.crc32(keys[i].encode()) / 2**32 < 0.5 for i in order]
    xs, ys = x.double().numpy()[order], y.numpy()[order]
    pool_x, pool_y = xs[np.array(train)], ys[np.array(train)]
    test_x, test_y = xs[~np.array(train)], ys[~np.array(train)]
    for k in shots:
        accs = []
        for seed in range(seeds):
            g = np.random.default_rng(seed)
            perms = [g.permutation(np.where(pool_y == cl)[0]) for cl in range(c)]
            idx = np.concatenate([p[:k] for p in perms])
            w, aug = _reference_weights(pool_x[idx], pool_y[idx], c, l2)
            accs.append(np.mean((aug(test_x) @ w).argmax(1) == test_y))
        assert res[f"{k}shot_top1"] == pytest.approx(np.mean(accs), abs=1e-4), k
        assert res[f"{k}shot_top1_std"] == pytest.approx(np.std(accs), abs=1e-4), k
    assert res["num_train_pool"] == sum(train) and res["num_test_images"] == 400 - sum(train)
    assert res["num_images"] == 400
    assert 1 / c + 0.1 < res["1shot_top1"] < res["8shot_top1"] < 0.99, res
    # the result does not depend on the order the rows arrive in (ranks, workers)
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(3))
    assert fs.run_fewshot(x[perm], y[perm], [keys[i] for i in perm.tolist()], c, shots, seeds, l2) == res


@pytest.mark.parametrize("informative", [True, False])
def test_planted_classes_are_learnt_and_random_labels_are_not(informative):
    c = 4
    x, y = _clusters(1200, c, 32, spread=0.3, seed=5, informative=informative)
    keys = [f"{i:06d}" for i in range(1200)]
    res = fs.run_fewshot(x, y, keys, c, shots=(1, 5, 10), seeds=5)
    for k in (1, 5, 10):
        if informative:
            assert res[f"{k}shot_top1"] > 0.99, res
        else:  # the embeddings say nothing of the labels: chance, 1/4, give or take the sampling
            assert abs(res[f"{k}shot_top1"] - 1 / c) < 0.06, res


def test_an_empty_side_reports_the_counts_only():
    x, y = _clusters(6, 2, 4, spread=0.3, seed=0)
    keys = [k for k in (f"{i}" for i in range(1000)) if zlib.crc32(k.encode()) / 2**32 < 0.5][:6]  # all pool
    assert fs.run_fewshot(x, y, keys, 2) == {"num_train_pool": 6.0, "num_test_images": 0.0, "num_images": 6.0}
    with pytest.raises(ValueError, match="disagree"):
        fs.run_fewshot(x, y, keys[:5], 2)
