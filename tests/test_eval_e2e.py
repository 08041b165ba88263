"""Evaluation as a user meets it: eval.py on a checkpoint, chance level of an untrained
model on the demo sets, and export of a checkpoint to a transformers folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, compose_cfg, fit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(module_tmp, cache_dir):
    cache = cache_dir  # the session's debug demo (tests/conftest.py)
    out = module_tmp("run")
    fit(compose_cfg(["trainer.max_steps=2"], cache, out))
    return cache, out / "checkpoints" / "last.ckpt"


def test_random_model_scores_near_chance_on_demo_sets(trained):
    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.eval.suite import evaluate_all
    from siglip2.model import build_model
    import yaml

    cache, _ = trained
    cfg = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    demo = ensure_demo(cache / "demo-n400-s0", num_train=400, seed=0)
    tok = build_tokenizer(demo.tokenizer_path, length=cfg["text"]["max_len"])
    cfg["text"]["vocab_size"] = tok.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg)
    res = evaluate_all([demo.zeroshot_yaml, demo.retrieval_yaml], model=model, tokenizer=tok,
                       image_size=cfg["vision"]["image_size"], batch_size=200)
    n_classes = len(yaml.safe_load(Path(demo.zeroshot_yaml).read_text())["classnames"])
    top1 = [v for k, v in res.items() if k.startswith("zeroshot/") and k.endswith("/top1")][0]
    r5 = [v for k, v in res.items() if k.startswith("retrieval/") and k.endswith("image_to_text_R@5")
          and "non_en" not in k][0]
    n_img = [v for k, v in res.items() if k.startswith("retrieval/") and k.endswith("/num_images")][0]
    assert abs(top1 - 1 / n_classes) < 0.1, top1          # chance = 1/8 on a balanced set
    assert r5 < 0.05 and n_img >= 500, (r5, n_img)       # chance ~ 5 * 3 captions / 1500


def test_eval_py_prints_table_and_writes_metrics(trained, tmp_path):
    cache, ckpt = trained
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "eval.py", f"ckpt_path={ckpt}", "eval=demo", "eval.max_batches=1", "data.demo.num_train=400",
         f"paths.cache_dir={cache}", f"paths.log_dir={tmp_path}", f"grid={tmp_path / 'grid.png'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(next(tmp_path.glob("eval/runs/*/metrics.json")).read_text())
    # the picture of predictions: 16 held-out images, 4 per row, boxes and text drawn
    import numpy as np
    from PIL import Image

    from siglip2.eval.grid import LEGEND_HEIGHT

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (LEGEND_HEIGHT + 4 * (224 + 68), 4 * (224 + 4), 3) and grid.std() > 20
    for key in ("zeroshot/demo_zeroshot/top1", "retrieval/demo_retrieval/image_to_text_R@5",
                "refexp/demo_refexp/acc@0.5", "segmentation/demo_segmentation/miou"):
        assert key in metrics and key in proc.stdout, (key, sorted(metrics))
        assert 0.0 <= metrics[key] <= 1.0


def test_eval_py_takes_the_demo_size_from_the_checkpoint(trained, tmp_path):
    """A debug checkpoint (demo of 400) evaluated without naming the demo: its own demo's sets
    and tokenizer, never a 20k demo build (~2 min, 285 MB; issue 27); eval.sets without brackets
    is one set."""
    cache, ckpt = trained
    proc = subprocess.run(
        [sys.executable, "eval.py", f"ckpt_path={ckpt}", "eval.max_batches=1", f"paths.cache_dir={cache}",
         f"paths.log_dir={tmp_path}", "eval.sets=${data.demo.root}/eval/zeroshot/zeroshot.yaml"],
        cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trained on the demo of 400 samples" in proc.stderr + proc.stdout
    assert "zeroshot/demo_zeroshot/top1" in proc.stdout
    assert not any(p.name.startswith("demo-n20000") for p in Path(cache).iterdir())


def test_naflex_grid_shows_each_elongated_image_at_its_own_aspect_per_length(trained):
    """The NaFlex picture (`eval.py grid=... eval.naflex_seq_len=...`): each image's views keep
    its aspect ratio within each length's patch budget, the patch grid is drawn, one column per length."""
    import numpy as np
    from PIL import Image

    from siglip2.checkpoint import read_checkpoint
    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.eval.naflex_grid import render_naflex_predictions

    cache, ckpt = trained
    c = read_checkpoint(str(ckpt))
    demo = ensure_demo(cache / "demo-n400-s0", num_train=400, seed=0)
    tok = build_tokenizer(demo.tokenizer_path, length=c.model_config.text.max_len)
    p = c.model_config.vision.patch_size
    png = render_naflex_predictions(demo.zeroshot_yaml, c.model("student"), tok, p, [32, 64, 144],
                                    str(Path(ckpt).parent / "nf.png"), aspect_min=1.6, n=3, cell=160)
    grid = np.asarray(Image.open(png))
    assert grid.shape == (3 * (160 + 30 + 4), 4 * (160 + 4), 3)
    # the 144-token view of the first row: yellow grid lines every patch, within the aspect-kept view
    tile = grid[:160, 3 * 164:3 * 164 + 160]
    yellow = (tile[..., 0] == 255) & (tile[..., 1] == 255) & (tile[..., 2] == 0)
    assert yellow.any(axis=0).sum() >= 5 and yellow.any(axis=1).sum() >= 5


def test_export_cli_gives_a_folder_transformers_loads(trained, tmp_path):
    from transformers import AutoModel

    from siglip2.export.__main__ import load_checkpoint_model, main

    _, ckpt = trained
    folder = main([f"ckpt_path={ckpt}", "format=hf", f"out={tmp_path / 'hf'}"])
    ours = load_checkpoint_model(str(ckpt))
    hf = AutoModel.from_pretrained(folder).eval()
    assert type(hf).__name__ == "SiglipModel"  # a fixed-resolution stage, with its square processor
    assert (folder / "tokenizer.model").is_file()  # the tokenizer the checkpoint recorded
    text = torch.randint(0, ours.config.text.vocab_size, (2, ours.config.text.max_len))
    with torch.no_grad():
        # HF's text pooler output is head(last token): the text embedding before normalisation.
        torch.testing.assert_close(hf.text_model(input_ids=text).pooler_output, ours.encode_text(text),
                                   atol=1e-5, rtol=1e-5)


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
        [sys.executable, "eval.py", f"ckpt_path={ckpt}", "data.demo.num_train=400", f"paths.cache_dir={cache}",
         f"paths.log_dir={tmp_path}", "eval.sets=[${data.demo.root}/eval/refexp/refexp.yaml]",
         "eval.refexp_probe={steps: 3, batch_size: 8}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
    res = evaluate_all([demo.refexp_yaml], model=model, tokenizer=tok, image_size=model.config.vision.image_size,
                       batch_size=200, decoder=None, refexp_probe={"steps": 2, "batch_size": 8})
    assert p + "acc@0.5" not in res and p + "probe_own_decoder_acc@0.5" not in res
    assert res[p + "probe_num_test_regions"] > 0 and 0.0 <= res[p + "probe_acc@0.5"] <= 1.0
    assert evaluate_all([demo.refexp_yaml], model=model, tokenizer=tok, image_size=64, batch_size=200) == {
        "_tables": {}, "_examples": {}}  # without the probe a decoder-less model is skipped, as before


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
            [sys.executable, "eval.py", f"ckpt_path={path}", "data.demo.num_train=400", f"paths.cache_dir={cache}",
             f"paths.log_dir={out}", sets, "eval.max_batches=1", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
        for key in ("zeroshot/demo_zeroshot/top1", "zeroshot/demo_zeroshot/top5",
                    "retrieval/demo_retrieval/image_to_text_R@5", "retrieval/demo_retrieval/text_to_image_R@5"):
            assert theirs[key] == pytest.approx(reference[key], abs=1e-6), (folder.name, key)
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    for name in ("config.json", "model.safetensors"):
        (empty / name).write_bytes((fixed / name).read_bytes())
    proc = subprocess.run([sys.executable, "eval.py", f"ckpt_path=hf:{empty}", f"paths.cache_dir={cache}",
                           "data.demo.num_train=400", f"paths.log_dir={tmp_path}", sets], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "holds no tokenizer" in proc.stderr, proc.stderr[-2000:]
