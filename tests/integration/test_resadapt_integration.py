"""Resolution adaptation end to end, the path a user runs: pretrain -> frac_0.95.ckpt ->
stage=resadapt at 96 px, exported to transformers (the references it rests on: big_vision's
resampling, scipy's zoom, transformers' Siglip2Model: tests/unit/test_resadapt.py)."""

from __future__ import annotations

import math

import pytest
import torch

from test_resadapt import _hf_embeds


# ---------------------------------------------------------------- the stage, end to end
@pytest.mark.e2e
def test_resadapt_from_the_95pct_checkpoint_64_to_96px_with_all_losses(cache_dir, debug_pretrain, tmp_path):
    from helpers import compose_cfg, fit

    ckpt = debug_pretrain / "checkpoints" / "frac_0.95.ckpt"  # distillation on from 80% of 6 steps
    source = torch.load(ckpt, map_location="cpu", weights_only=True)
    trainer, stage = fit(
        compose_cfg(
            ["stage=resadapt", f"init_from={ckpt}", "model.vision.image_size=96"], cache_dir, tmp_path / "resadapt"
        )
    )
    # the window's steps: 5% of the pretraining recipe's examples at batch 16
    total = source["siglip2"]["recipe"]["examples"]
    assert trainer.max_steps == math.ceil(0.05 * total / 16) and trainer.global_step == trainer.max_steps
    assert all(stage.loss_enabled.values()) and set(stage.loss_enabled) == {
        "sigmoid",
        "locca",
        "local_to_global",
        "masked",
    }
    metrics = trainer.callback_metrics
    for name in ("sigmoid", "locca", "local_to_global", "masked"):
        assert torch.isfinite(metrics[f"train/loss_{name}"]), name
    # adapted: student and teacher at a 12x12 table; the checkpoint records the new configuration
    out = torch.load(tmp_path / "resadapt" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta = out["siglip2"]
    assert meta["stage"] == "resadapt"
    assert (meta["model"]["vision"]["image_size"], meta["model"]["vision"]["posemb_grid"]) == (96, 12)
    for prefix in ("model.vision_model.", "teacher.vision."):
        assert out["state_dict"][prefix + "embeddings.position_embedding.weight"].shape == (144, 128)
    assert meta["init_from"]["not_in_checkpoint"] == []  # nothing of the 95% checkpoint lost
    assert any("8x8 -> 12x12" in n for n in meta["init_from"]["adapted"])
    assert meta["recipe"]["progress"] == pytest.approx(1.0)
    # the lr continued the pretraining cosine from 95% (no warmup, no restart)
    start, warm = round(0.95 * total), stage.clock.warmup_examples  # recipe examples at 95%, warmup
    assert warm < start
    want = 0.5 * (1 + math.cos(math.pi * (start - warm) / (total - warm)))
    assert stage.clock.lr_factor(0) == pytest.approx(want, rel=1e-9)
    # export at the adapted resolution: HF's config has the 12x12 table and reproduces our embeddings
    from transformers import Siglip2Model

    from siglip2.checkpoint import read_checkpoint
    from siglip2.export import save_hf

    last = tmp_path / "resadapt" / "checkpoints" / "last.ckpt"
    ours = read_checkpoint(str(last)).model()
    hf = Siglip2Model.from_pretrained(save_hf(ours, tmp_path / "hf")).eval()
    assert hf.config.vision_config.num_patches == 144 and hf.config.vision_config.patch_size == 8
    with torch.no_grad():
        image = torch.rand(2, 3, 96, 96) * 2 - 1
        text = torch.randint(0, ours.config.text.vocab_size, (2, ours.config.text.max_len))
        ref_img, ref_txt = _hf_embeds(hf, image, text, 8)
        torch.testing.assert_close(ours.encode_image(image=image).embeds, ref_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.embed_text(text), ref_txt, atol=1e-5, rtol=1e-5)
    # a checkpoint of this stage at another resolution, or of another stage, cannot be resumed
    with pytest.raises(ValueError, match=r"vision.image_size \(96 in the checkpoint, 128 here\)"):
        fit(
            compose_cfg(
                ["stage=resadapt", f"ckpt_path={last}", "model.vision.image_size=128", "stage.clock.fit_window=false"],
                cache_dir,
                tmp_path / "bad",
            )
        )
    with pytest.raises(ValueError, match="checkpoint is from stage 'resadapt'"):
        fit(compose_cfg([f"ckpt_path={last}", "model.vision.image_size=96"], cache_dir, tmp_path / "bad2"))
