"""Evaluation in process on a 2-step checkpoint: chance level of an untrained model on the demo
sets, the NaFlex picture, and export of the checkpoint to a folder transformers loads (eval.py
as a user runs it: tests/e2e/test_eval_e2e.py)."""

from __future__ import annotations

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
    res = evaluate_all(
        [demo.zeroshot_yaml, demo.retrieval_yaml],
        model=model,
        tokenizer=tok,
        image_size=cfg["vision"]["image_size"],
        batch_size=200,
    )
    n_classes = len(yaml.safe_load(Path(demo.zeroshot_yaml).read_text())["classnames"])
    top1 = [v for k, v in res.items() if k.startswith("zeroshot/") and k.endswith("/top1")][0]
    r5 = [
        v
        for k, v in res.items()
        if k.startswith("retrieval/") and k.endswith("image_to_text_R@5") and "non_en" not in k
    ][0]
    n_img = [v for k, v in res.items() if k.startswith("retrieval/") and k.endswith("/num_images")][0]
    assert abs(top1 - 1 / n_classes) < 0.1, top1  # chance = 1/8 on a balanced set
    assert r5 < 0.05 and n_img >= 500, (r5, n_img)  # chance ~ 5 * 3 captions / 1500


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
    png = render_naflex_predictions(
        demo.zeroshot_yaml,
        c.model("student"),
        tok,
        p,
        [32, 64, 144],
        str(Path(ckpt).parent / "nf.png"),
        aspect_min=1.6,
        n=3,
        cell=160,
    )
    grid = np.asarray(Image.open(png))
    assert grid.shape == (3 * (160 + 30 + 4), 4 * (160 + 4), 3)
    # the 144-token view of the first row: yellow grid lines every patch, within the aspect-kept view
    tile = grid[:160, 3 * 164 : 3 * 164 + 160]
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
        torch.testing.assert_close(
            hf.text_model(input_ids=text).pooler_output, ours.encode_text(text), atol=1e-5, rtol=1e-5
        )
