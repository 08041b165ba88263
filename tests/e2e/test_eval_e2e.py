"""Evaluation as a user meets it: eval.py on a checkpoint (its table, metrics and picture, the
refexp probe, a transformers folder read as the checkpoint is); chance level, the NaFlex picture
and export in process: tests/integration/test_eval_integration.py, whose 2-step checkpoint
(`trained`, one per module) these read too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from test_eval_integration import trained  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e


def test_eval_py_prints_table_and_writes_metrics(trained, tmp_path):
    cache, ckpt = trained
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={ckpt}",
            "eval=demo",
            "eval.max_batches=1",
            "data.demo.num_train=400",
            f"paths.cache_dir={cache}",
            f"paths.log_dir={tmp_path}",
            f"grid={tmp_path / 'grid.png'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(next(tmp_path.glob("eval/runs/*/metrics.json")).read_text())
    # the picture of predictions: 16 held-out images, 4 per row, boxes and text drawn
    import numpy as np
    from PIL import Image

    from siglip2.eval.grid import LEGEND_HEIGHT

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (LEGEND_HEIGHT + 4 * (224 + 68), 4 * (224 + 4), 3) and grid.std() > 20
    for key in (
        "zeroshot/demo_zeroshot/top1",
        "retrieval/demo_retrieval/image_to_text_R@5",
        "refexp/demo_refexp/acc@0.5",
        "segmentation/demo_segmentation/miou",
    ):
        assert key in metrics and key in proc.stdout, (key, sorted(metrics))
        assert 0.0 <= metrics[key] <= 1.0


def test_eval_py_takes_the_demo_size_from_the_checkpoint(trained, tmp_path):
    """A debug checkpoint (demo of 400) evaluated without naming the demo: its own demo's sets
    and tokenizer, never a 20k demo build (~2 min, 285 MB; issue 27); eval.sets without brackets
    is one set."""
    cache, ckpt = trained
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={ckpt}",
            "eval.max_batches=1",
            f"paths.cache_dir={cache}",
            f"paths.log_dir={tmp_path}",
            "eval.sets=${data.demo.root}/eval/zeroshot/zeroshot.yaml",
        ],
        cwd=ROOT,
        env=dict(os.environ, WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trained on the demo of 400 samples" in proc.stderr + proc.stdout
    assert "zeroshot/demo_zeroshot/top1" in proc.stdout
    assert not any(p.name.startswith("demo-n20000") for p in Path(cache).iterdir())


def test_refexp_probe_trains_a_fresh_decoder_beside_the_models_own(trained, tmp_path):
    """`eval.refexp_probe` (the paper's Table 5 protocol): eval.py trains a fresh decoder on the
    frozen tower with the set's training keys and scores the held-out ones, beside the model's
    own LocCa decoder on the same regions; a model without a decoder is scored by the probe
    alone (before, its refexp sets were skipped)."""
    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.eval.suite import evaluate_all
    from siglip2.checkpoint import read_checkpoint

    cache, ckpt = trained
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={ckpt}",
            "data.demo.num_train=400",
            f"paths.cache_dir={cache}",
            f"paths.log_dir={tmp_path}",
            "eval.sets=[${data.demo.root}/eval/refexp/refexp.yaml]",
            "eval.refexp_probe={steps: 3, batch_size: 8}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(next(tmp_path.glob("eval/runs/*/metrics.json")).read_text())
    p = "refexp/demo_refexp/"
    total = metrics[p + "num_regions"]
    assert metrics[p + "probe_num_train_regions"] + metrics[p + "probe_num_test_regions"] == total
    assert 0.3 * total < metrics[p + "probe_num_train_regions"] < 0.7 * total  # half the keys, by hash
    for key in ("acc@0.5", "probe_acc@0.5", "probe_own_decoder_acc@0.5"):
        assert 0.0 <= metrics[p + key] <= 1.0 and p + key in proc.stdout, key
    # a model without a LocCa decoder: only the probe scores it
    demo = ensure_demo(cache / "demo-n400-s0", num_train=400, seed=0)
    model = read_checkpoint(str(ckpt)).model("student")
    tok = build_tokenizer(demo.tokenizer_path, length=model.config.text.max_len)
    res = evaluate_all(
        [demo.refexp_yaml],
        model=model,
        tokenizer=tok,
        image_size=model.config.vision.image_size,
        batch_size=200,
        decoder=None,
        refexp_probe={"steps": 2, "batch_size": 8},
    )
    assert p + "acc@0.5" not in res and p + "probe_own_decoder_acc@0.5" not in res
    assert res[p + "probe_num_test_regions"] > 0 and 0.0 <= res[p + "probe_acc@0.5"] <= 1.0
    assert evaluate_all([demo.refexp_yaml], model=model, tokenizer=tok, image_size=64, batch_size=200) == {
        "_tables": {},
        "_examples": {},
    }  # without the probe a decoder-less model is skipped, as before


def test_eval_py_reads_a_transformers_folder_as_it_reads_the_checkpoint(trained, tmp_path):
    """`eval.py ckpt_path=hf:<folder>`: a transformers folder (a released download's layout; here
    the checkpoint's export, fixed-resolution `SiglipModel` and NaFlex `Siglip2Model`) is
    evaluated with the folder's own tokenizer, to the same numbers as the checkpoint itself."""
    from siglip2.export.__main__ import main

    cache, ckpt = trained
    env = dict(os.environ, WANDB_MODE="disabled")
    sets = "eval.sets=[${data.demo.root}/eval/zeroshot/zeroshot.yaml,${data.demo.root}/eval/retrieval/retrieval.yaml]"

    def run(path, out, *extra):
        proc = subprocess.run(
            [
                sys.executable,
                "eval.py",
                f"ckpt_path={path}",
                "data.demo.num_train=400",
                f"paths.cache_dir={cache}",
                f"paths.log_dir={out}",
                sets,
                "eval.max_batches=1",
                *extra,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(next(out.glob("eval/runs/*/metrics.json")).read_text()), proc.stdout + proc.stderr

    fixed = main([f"ckpt_path={ckpt}", "format=hf", f"out={tmp_path / 'fixed'}"])
    naflex = main([f"ckpt_path={ckpt}", "format=siglip2", f"out={tmp_path / 'naflex'}"])
    own, _ = run(ckpt, tmp_path / "own")
    # a NaFlex folder is evaluated as its processor sees images: at its max_num_patches
    max_patches = json.loads((naflex / "preprocessor_config.json").read_text())["max_num_patches"]
    own_naflex, _ = run(ckpt, tmp_path / "own_naflex", f"eval.naflex_seq_len={max_patches}")
    for folder, reference in ((fixed, own), (naflex, own_naflex)):
        theirs, log_text = run(f"hf:{folder}", tmp_path / f"hf_{folder.name}")
        assert f"tokenizer: {folder} (lower-casing on)" in log_text  # our export lower-cases, as training
        for key in (
            "zeroshot/demo_zeroshot/top1",
            "zeroshot/demo_zeroshot/top5",
            "retrieval/demo_retrieval/image_to_text_R@5",
            "retrieval/demo_retrieval/text_to_image_R@5",
        ):
            assert theirs[key] == pytest.approx(reference[key], abs=1e-6), (folder.name, key)
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    for name in ("config.json", "model.safetensors"):
        (empty / name).write_bytes((fixed / name).read_bytes())
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path=hf:{empty}",
            f"paths.cache_dir={cache}",
            "data.demo.num_train=400",
            f"paths.log_dir={tmp_path}",
            sets,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "holds no tokenizer" in proc.stderr, proc.stderr[-2000:]
