"""ACID distillation: pair losses, learnability, JEST selection and the stage [P §2.5; issue 16].

References: open_clip's `SigLipLoss` (the pair losses must add up to it), JEST's joint
selection written out below as its definition (each candidate's gain in the chosen batch's
summed learnability, from explicit sub-matrix sums), the tokenizer itself (re-padding ids to
another length), and the path a user runs (`stage=acid` from a pretraining checkpoint, with
a teacher of another resolution and text length, on two DDP processes).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from siglip2.acid import CurationConfig, chunk_sizes, gumbel, independent_select, joint_select, random_select, select
from siglip2.losses.sigmoid import SigmoidLoss, sigmoid_pair_losses


def _emb(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


# ---------------------------------------------------------------- pair losses
@pytest.mark.parametrize("chunk", [3, 1024])
def test_pair_losses_sum_to_the_sigmoid_loss_and_open_clip(chunk):
    from open_clip.loss import SigLipLoss

    x, y = _emb(10, 16, 0), _emb(10, 16, 1)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    pairs = sigmoid_pair_losses(x, y, t, b, chunk_size=chunk)
    assert pairs.shape == (10, 10) and not pairs.requires_grad
    ours, _ = SigmoidLoss()(x, y, t, b)
    ref = SigLipLoss()(x, y, t, b)
    torch.testing.assert_close(pairs.sum() / 10, ours)
    torch.testing.assert_close(pairs.sum() / 10, ref)
    # each term is the pair's own: positive on the diagonal, negative elsewhere
    logits = t * x @ y.T + b
    torch.testing.assert_close(pairs.diagonal(), -F.logsigmoid(logits.diagonal()))
    torch.testing.assert_close(pairs[0, 1], -F.logsigmoid(-logits[0, 1]))


# ---------------------------------------------------------------- selection
def _brute_force_joint(a: torch.Tensor, k: int, n_chunks: int, gen: torch.Generator) -> list[int]:
    """JEST's joint selection by its definition: a candidate's score is what it adds to the
    summed learnability of the chosen sub-matrix, sum(A[S+c, S+c]) - sum(A[S, S]), from
    explicit sums; each chunk takes the top of score + Gumbel noise (one vector per chunk)."""
    a = a.double()
    n = a.shape[0]
    chosen: list[int] = []
    base, extra = divmod(k, min(n_chunks, k))
    for c in range(min(n_chunks, k)):
        size = base + (1 if c < extra else 0)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        noise = -torch.log(-torch.log(u))
        before = sum(float(a[i, j]) for i in chosen for j in chosen)
        scores = {}
        for cand in range(n):
            if cand in chosen:
                continue
            s = chosen + [cand]
            scores[cand] = sum(float(a[i, j]) for i in s for j in s) - before + float(noise[cand])
        chosen += sorted(scores, key=lambda c: -scores[c])[:size]
    return chosen


@pytest.mark.parametrize("n,k,chunks,seed", [(8, 4, 2, 0), (12, 6, 3, 1), (10, 7, 16, 2), (6, 6, 4, 3), (9, 1, 1, 4)])
def test_joint_selection_equals_the_brute_force_definition(n, k, chunks, seed):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(100 + seed)) * 3
    ours = joint_select(a, k, chunks, torch.Generator().manual_seed(seed))
    ref = _brute_force_joint(a, k, chunks, torch.Generator().manual_seed(seed))
    assert ours.tolist() == ref
    assert len(set(ours.tolist())) == k


def test_chunks_split_the_batch_and_selection_refuses_impossible_requests():
    assert chunk_sizes(32, 16) == [2] * 16 and chunk_sizes(5, 16) == [1] * 5 and chunk_sizes(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="cannot choose 9 examples from 8"):
        joint_select(torch.zeros(8, 8), 9)
    with pytest.raises(ValueError, match="square"):
        joint_select(torch.zeros(8, 7), 2)
    with pytest.raises(ValueError, match="filter_ratio"):
        CurationConfig(filter_ratio=1.0)
    with pytest.raises(ValueError, match="method"):
        CurationConfig(method="best")
    assert CurationConfig(filter_ratio=0.5).super_batch(32) == 64
    assert CurationConfig(filter_ratio=0.75).super_batch(32) == 128
    assert CurationConfig(filter_ratio=0.0).super_batch(32) == 32


@pytest.mark.parametrize("method", ["joint", "sample"])
def test_zero_learnability_selects_uniformly(method):
    """A teacher equal to the learner has zero learnability: every example is equally
    likely (chi-square over 3000 draws of 4 of 8, p > 0.001)."""
    n, k, draws = 8, 4, 3000
    counts = torch.zeros(n)
    gen = torch.Generator().manual_seed(0)
    cfg = CurationConfig(method=method, n_chunks=2)
    for _ in range(draws):
        counts[select(torch.zeros(n, n), n, k, cfg, gen)] += 1
    expected = draws * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 26.1, (counts, chi2)  # chi-square(7 dof) 0.999 quantile: 24.3; 26.1 ~ p=5e-4


def test_planted_easy_for_teacher_hard_for_learner_examples_are_chosen_first():
    """Examples 3, 7, 11, 13 are matched pairs the teacher separates and the learner does
    not (their captions swapped for it); the rest are equally easy for both. All selection
    methods that score put the planted ones first; random does not know them."""
    n, d = 16, 512  # nearly orthogonal images: each planted diagonal gap is 7-12 nats
    planted = [3, 7, 11, 13]
    img = _emb(n, d, 0)
    teacher_txt = img.clone()
    learner_txt = img.clone()
    learner_txt[planted] = img[[7, 11, 13, 3]]  # the learner pairs each planted image with another's caption
    t, b = torch.tensor(20.0), torch.tensor(-10.0)
    a = sigmoid_pair_losses(img, learner_txt, t, b) - sigmoid_pair_losses(img, teacher_txt, t, b)
    for method in ("joint", "sample", "topk"):
        for seed in range(5):
            idx = select(a, n, 4, CurationConfig(method=method, n_chunks=4), torch.Generator().manual_seed(seed))
            assert sorted(idx.tolist()) == planted, (method, seed)
    rnd = [sorted(random_select(n, 4, torch.Generator().manual_seed(s)).tolist()) for s in range(20)]
    assert any(r != planted for r in rnd)
    # independent top-k is the diagonal's order
    assert independent_select(a, 4, sample=False).tolist() == a.diagonal().topk(4).indices.tolist()


def test_gumbel_noise_is_standard_gumbel():
    g = gumbel(200_000, torch.Generator().manual_seed(0), "cpu")
    assert abs(float(g.mean()) - 0.5772) < 0.01 and abs(float(g.var()) - math.pi**2 / 6) < 0.03


# ---------------------------------------------------------------- the stage's pieces
def test_refit_text_length_equals_tokenizing_at_that_length(cache_dir):
    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.acid import refit_text_length

    demo = ensure_demo(str(cache_dir / "demo-n400-s0"), num_train=400, seed=0)
    tok = build_tokenizer(str(demo.tokenizer_path), length=40)
    captions = ["a red circle above a blue square", "x", "two green triangles left of a big yellow star " * 3]
    ids = tok(captions)
    for length in (8, 12, 40):
        torch.testing.assert_close(refit_text_length(ids, length, tok.pad_id, tok.eos_id), tok(captions, length=length))
    longer = refit_text_length(ids, 64, tok.pad_id, tok.eos_id)
    torch.testing.assert_close(longer[:2], tok(captions[:2], length=64))  # captions that fit are exact
    assert torch.equal(longer[2, :40], ids[2]) and bool((longer[2, 40:] == tok.pad_id).all())  # a cut one stays cut


def test_chosen_share_per_language():
    from stages.acid import chosen_share, subset

    langs = ["en"] * 6 + ["de", "fr"]
    assert chosen_share(langs, [0, 1, 6]) == {"en": 2 / 6, "non_en": 1 / 2}
    assert chosen_share(["", ""], [0]) == {} and chosen_share(None, [0]) == {}
    batch = {"image": torch.arange(8).reshape(8, 1), "key": [str(i) for i in range(8)], "lang": langs}
    sub = subset(batch, torch.tensor([7, 2]))
    assert sub["image"].tolist() == [[7], [2]] and sub["key"] == ["7", "2"] and sub["lang"] == ["fr", "en"]


def test_noisy_share_counts_the_chosen_noisy_and_clean_examples():
    from stages.acid import noisy_share

    noisy = torch.tensor([True, True, True, False, False, False, False, False])
    assert noisy_share(noisy, torch.tensor([0, 3, 4, 5])) == {"noisy": 1 / 3, "clean": 3 / 5}
    assert noisy_share(torch.zeros(4, dtype=torch.bool), torch.tensor([1])) == {"clean": 1 / 4}
    assert noisy_share(None, torch.tensor([0])) == {}


def _hf_teacher(tmp_path: Path, vocab: int, image_size: int, max_len: int, seed: int = 0) -> Path:
    """A random teacher of another resolution and text length, saved as a transformers folder."""
    from siglip2.export import save_hf
    from siglip2.model import build_model

    torch.manual_seed(seed)
    model = build_model(
        dict(
            name="teacher",
            embed_dim=64,
            vision=dict(
                width=64,
                depth=2,
                mlp_dim=128,
                heads=4,
                patch_size=8,
                posemb_grid=image_size // 8,
                image_size=image_size,
            ),
            text=dict(width=64, depth=2, mlp_dim=128, heads=4, vocab_size=vocab, max_len=max_len),
        )
    )
    return save_hf(model, tmp_path / "teacher_hf")


@pytest.mark.e2e
def test_teacher_equal_to_learner_gives_zero_learnability(cache_dir, debug_pretrain):
    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from helpers import compose_cfg
    from stages.runner import build_stage

    ckpt = debug_pretrain / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(["stage=acid", f"stage.acid.teacher={ckpt}"], cache_dir, debug_pretrain)
    demo = ensure_demo(str(cache_dir / "demo-n400-s0"), num_train=400, seed=0)
    tok = build_tokenizer(str(demo.tokenizer_path), length=40)
    stage = build_stage(cfg, vocab_size=tok.vocab_size)
    stage.load_weights(str(ckpt))
    assert stage.optim_config.lr == 1e-5 and stage.optim_config.weight_decay == 0.0  # the paper's ACID optimiser
    image = torch.rand(12, 3, 64, 64) * 2 - 1
    text = tok([f"caption number {i}" for i in range(12)])
    s = stage.score({"image": image, "text": text})
    assert s["learnability"].shape == (12, 12)
    assert float(s["learnability"].abs().max()) < 1e-5
    assert float(s["learner"].mean()) > 0


@pytest.mark.e2e
def test_teacher_with_another_vocabulary_is_refused_before_training(cache_dir, debug_pretrain, tmp_path):
    from helpers import compose_cfg
    from stages.runner import build

    teacher = _hf_teacher(tmp_path, vocab=123, image_size=64, max_len=40)
    cfg = compose_cfg(
        ["stage=acid", f"init_from={debug_pretrain}/checkpoints/last.ckpt", f"stage.acid.teacher=hf:{teacher}"],
        cache_dir,
        tmp_path,
    )
    with pytest.raises(Exception, match="has a vocabulary of 123 tokens but the learner"):  # Hydra wraps the ValueError
        build(cfg)


@pytest.mark.e2e
def test_acid_trains_on_two_ddp_processes_with_a_teacher_of_another_size(cache_dir, debug_pretrain, tmp_path):
    """`stage=acid` as a user runs it: a pretraining checkpoint, a teacher of another
    resolution (96 px) and text length (48) from a transformers folder, two gloo ranks. Each
    rank loads 32 (b / (1 - 0.5)) and trains 16; the clock and the logs count the trained ones.
    With `data.caption_noise` the selection reports what share of noisy and clean it kept."""
    from helpers import cli

    vocab = torch.load(debug_pretrain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["siglip2"][
        "model"
    ]["text"]["vocab_size"]
    teacher = _hf_teacher(tmp_path, vocab=vocab, image_size=96, max_len=48)
    proc = cli(
        [
            "debug=fast",
            "stage=acid",
            "trainer=ddp_cpu",
            "trainer.max_steps=3",
            f"init_from={debug_pretrain}/checkpoints/last.ckpt",
            f"stage.acid.teacher=hf:{teacher}",
            "stage.acid.n_chunks=4",
            "data.caption_noise=0.3",
        ],
        cache_dir,
        tmp_path / "logs",
    )
    metrics_path = Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1])
    metrics = json.loads(metrics_path.read_text())
    assert metrics["global_step"] == 3
    # data.caption_noise flags the replaced captions through both ranks' loaders and the selection
    assert 0.0 <= metrics["acid/chosen_frac_noisy"] <= 1.0 and 0.0 < metrics["acid/chosen_frac_clean"] <= 1.0
    assert metrics["train/examples_seen"] == 3 * 2 * 16  # the final count: trained examples, not the super-batches
    for key in (
        "acid/learnability_chosen",
        "acid/learnability_all",
        "acid/learner_loss",
        "acid/teacher_loss",
        "train/loss_sigmoid",
    ):
        assert math.isfinite(metrics[key]), key
    assert 0.0 < metrics["acid/chosen_frac_en"] <= 1.0
    meta = torch.load(metrics_path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "siglip2"
    ]
    assert meta["stage"] == "acid" and meta["acid"]["teacher"]["path"] == f"hf:{teacher}"
    assert meta["acid"]["teacher"]["model"]["vision"]["image_size"] == 96
    # the teacher scored source pixels at its own 96 px (stage.acid.teacher_pixels=source)
    assert "scores each image squashed from the source to 96 px" in (metrics_path.parent / "train.log").read_text()
    assert meta["examples_seen"] == 3 * 2 * 16  # each rank loads 32 and trains 16
    assert meta["init_from"]["stage"] == "pretrain" and meta["recipe"]["examples"] == 3 * 2 * 16


@pytest.mark.e2e
def test_teacher_cache_gives_the_live_teachers_scores_on_training_batches(cache_dir, debug_pretrain, tmp_path):
    """`python -m siglip2.acid cache` over the training shards, then a super-batch
    from the real training loader: the stage scores it from the cache exactly as with the
    teacher running (the teacher is frozen and the cached inputs are training's)."""
    import subprocess
    import sys

    from stages.runner import build_datamodule

    from siglip2.acid import TeacherCache
    from stages.runner import build_stage
    from helpers import compose_cfg

    ckpt = debug_pretrain / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(["stage=acid", f"stage.acid.teacher={ckpt}"], cache_dir, tmp_path)
    data = build_datamodule(cfg)
    out = tmp_path / "teacher_cache.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "siglip2.acid",
            "cache",
            "--teacher",
            str(ckpt),
            "--shards",
            data.sources,
            "--tokenizer",
            str(cfg.tokenizer.path),
            "--text-length",
            "40",
            "--out",
            str(out),
            "--batch-size",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": "."},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(TeacherCache(out).keys) == 400  # every training sample of the debug demo
    from siglip2.data.tokenizer import tokenizer_fingerprint

    # the ids it was encoded from: a run with another tokenizer is refused at fit start (TokenizerRecord.check)
    assert TeacherCache(out).tokenizer["sha256"] == tokenizer_fingerprint(str(cfg.tokenizer.path))["sha256"]
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape[0] == 32  # b / (1 - f) = 16 / 0.5
    live = build_stage(cfg, vocab_size=data.tokenizer.vocab_size)
    cached = build_stage(
        compose_cfg(["stage=acid", f"stage.acid.teacher_cache={out}"], cache_dir, tmp_path),
        vocab_size=data.tokenizer.vocab_size,
    )
    cached.load_state_dict(live.state_dict())
    a, b = live.score(batch), cached.score(batch)
    torch.testing.assert_close(a["teacher"], b["teacher"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["learnability"], b["learnability"], atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError, match="1 of 2 samples are not in the teacher cache"):
        cached.score({**batch, "image": batch["image"][:2], "text": batch["text"][:2], "key": [batch["key"][0], "x"]})


@pytest.mark.e2e
def test_a_teacher_of_another_resolution_scores_source_pixels_live_and_cached(cache_dir, debug_pretrain, tmp_path):
    """A 96 px teacher of a 64 px learner: with `teacher_pixels=source` (the default) the stage
    asks the loader for `teacher_image`, each source image squashed to 96 px, and the cache
    builder decodes at the teacher's size by itself: both give the same teacher losses. The
    learner's 64 px batch upsampled to 96 px (`teacher_pixels=batch`, the only path before
    issue 29) gives other losses: the bias this removes."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from stages.runner import build_datamodule

    from siglip2.acid import TeacherCache
    from stages.runner import build_stage
    from helpers import compose_cfg

    vocab = torch.load(debug_pretrain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["siglip2"][
        "model"
    ]["text"]["vocab_size"]
    teacher = _hf_teacher(tmp_path, vocab=vocab, image_size=96, max_len=40)
    cfg = compose_cfg(["stage=acid", f"stage.acid.teacher=hf:{teacher}"], cache_dir, tmp_path)
    data = build_datamodule(cfg)
    live = build_stage(cfg, vocab_size=data.tokenizer.vocab_size)
    live._trainer = SimpleNamespace(datamodule=data)
    live.setup("fit")
    assert data.teacher_image_size == 96
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape[-2:] == (64, 64) and batch["teacher_image"].shape[-2:] == (96, 96)
    assert batch["teacher_image"].dtype == torch.uint8  # made float on the device, as `image`
    out = tmp_path / "teacher_cache.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "siglip2.acid",
            "cache",
            "--teacher",
            f"hf:{teacher}",
            "--shards",
            data.sources,
            "--tokenizer",
            str(cfg.tokenizer.path),
            "--text-length",
            "40",
            "--out",
            str(out),
            "--batch-size",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": "."},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TeacherCache(out).image_size == 96
    cached = build_stage(
        compose_cfg(["stage=acid", f"stage.acid.teacher_cache={out}"], cache_dir, tmp_path),
        vocab_size=data.tokenizer.vocab_size,
    )
    cached.load_state_dict(live.state_dict())
    source, from_cache = live.score(batch), cached.score(batch)
    torch.testing.assert_close(source["teacher"], from_cache["teacher"], atol=1e-4, rtol=1e-4)
    upsampled = live.score({k: v for k, v in batch.items() if k != "teacher_image"})
    assert float((upsampled["teacher"] - source["teacher"]).abs().max()) > 1e-3
    # teacher_pixels=batch: the loader is not asked for a second image
    data2 = build_datamodule(cfg)
    batch_mode = build_stage(
        compose_cfg(
            ["stage=acid", f"stage.acid.teacher=hf:{teacher}", "stage.acid.teacher_pixels=batch"], cache_dir, tmp_path
        ),
        vocab_size=data.tokenizer.vocab_size,
    )
    batch_mode._trainer = SimpleNamespace(datamodule=data2)
    batch_mode.setup("fit")
    assert data2.teacher_image_size is None and "teacher_image" not in next(iter(data2.train_dataloader()))
