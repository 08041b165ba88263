"""One checkpoint reader (siglip2/checkpoint.py): a checkpoint rebuilds exactly the model it
holds, after any adaptation, and exports to transformers with the same outputs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from siglip2.checkpoint import read_checkpoint
from siglip2.export.__main__ import main as export_main
from stages.pretrain import PretrainStage

MODEL = {
    "name": "t",
    "embed_dim": 32,
    "vision": dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4, posemb_grid=4, image_size=16),
    "text": dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10),
}
LOSSES = {"sigmoid": {}, "locca": {"targets": {"max_len": 10}}}


def _save(stage, path):
    """What Lightning's `trainer.save_checkpoint` writes for this module (state + our hook)."""
    checkpoint = {"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}
    stage.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


@torch.no_grad()
def test_adapted_model_round_trips_through_checkpoint_export_and_transformers(tmp_path):
    from transformers import Siglip2Model

    torch.manual_seed(0)
    stage = PretrainStage(model=MODEL, optim={}, losses=LOSSES).eval()
    # Resolution stage: /4 patches -> /2 (FlexiViT PI-resize), 4x4 position table -> 6x6.
    stage.model.vision_model.adapt(patch_size=2, posemb_grid=6)
    _save(stage, tmp_path / "adapted.ckpt")

    ckpt = read_checkpoint(str(tmp_path / "adapted.ckpt"))
    assert ckpt.stage == "pretrain"
    assert (ckpt.model_config.vision.patch_size, ckpt.model_config.vision.posemb_grid) == (2, 6)
    model = ckpt.model()
    image, text = torch.randn(2, 3, 12, 12), torch.randint(0, 50, (2, 10))
    ours = stage.model.encode_image(image=image)
    torch.testing.assert_close(model.encode_image(image=image).pooled, ours.pooled, rtol=0, atol=0)
    torch.testing.assert_close(model.embed_text(text), stage.model.embed_text(text), rtol=0, atol=0)
    decoder = ckpt.locca_decoder()
    tokens = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(decoder(tokens, ours.tokens), stage.locca_decoder()(tokens, ours.tokens))

    # the default export of a fixed-resolution stage: SiglipModel, square inputs, same numbers
    from transformers import AutoModel

    fixed = AutoModel.from_pretrained(
        export_main([f"ckpt_path={tmp_path / 'adapted.ckpt'}", f"out={tmp_path / 'fixed'}"])
    ).eval()
    assert type(fixed).__name__ == "SiglipModel"
    square = torch.randn(2, 3, 16, 16)  # the checkpoint's image_size: an 8x8 grid of the 6x6 table, resized
    torch.testing.assert_close(
        fixed.vision_model(pixel_values=square).pooler_output,
        stage.model.encode_image(image=square).pooled,
        rtol=1e-4,
        atol=1e-5,
    )

    folder = export_main([f"ckpt_path={tmp_path / 'adapted.ckpt'}", f"out={tmp_path / 'hf'}", "format=siglip2"])
    hf = Siglip2Model.from_pretrained(folder).eval()
    assert hf.config.vision_config.patch_size == 2 and hf.config.vision_config.num_patches == 36
    pv = image.reshape(2, 3, 6, 2, 6, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 36, 12)
    ref = hf(
        input_ids=text,
        pixel_values=pv,
        pixel_attention_mask=torch.ones(2, 36, dtype=torch.long),
        spatial_shapes=torch.tensor([[6, 6], [6, 6]]),
    )
    torch.testing.assert_close(ours.pooled, ref.vision_model_output.pooler_output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stage.model.embed_text(text), ref.text_embeds, rtol=1e-4, atol=1e-5)


def test_teacher_weights_are_refused_by_name_when_absent(tmp_path):
    torch.manual_seed(0)
    stage = PretrainStage(model=MODEL, optim={}, losses={"sigmoid": {}})
    _save(stage, tmp_path / "s.ckpt")
    ckpt = read_checkpoint(str(tmp_path / "s.ckpt"))
    assert ckpt.locca_decoder() is None
    with pytest.raises(ValueError, match="no teacher weights"):
        ckpt.model("teacher")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a siglip2 training checkpoint"):
        read_checkpoint(str(tmp_path / "other.ckpt"))
    # a run folder given for a checkpoint: named as a folder, with the files it holds
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint.*run/checkpoints/last\.ckpt"):
        read_checkpoint(str(run))


def test_format_1_checkpoints_still_read(tmp_path):
    """Checkpoints written before the losses moved into `losses.` (LocCa under `locca.`,
    loss configs only in Lightning's hyper_parameters) read the same."""
    torch.manual_seed(0)
    stage = PretrainStage(model=MODEL, optim={}, losses=LOSSES).eval()
    old = {k.replace("losses.locca.", "locca.", 1): v for k, v in stage.state_dict().items()}
    torch.save(
        {
            "state_dict": old,
            "hyper_parameters": {"losses": LOSSES},
            "siglip2": {
                "stage": "pretrain",
                "model": stage.model.config.to_dict(),
                "loss_enabled": {"sigmoid": True, "locca": True},
            },
        },
        tmp_path / "v1.ckpt",
    )
    ckpt = read_checkpoint(str(tmp_path / "v1.ckpt"))
    tokens, image_tokens = torch.randint(0, 50, (1, 4)), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ckpt.locca_decoder()(tokens, image_tokens), stage.locca_decoder()(tokens, image_tokens)
        )


@torch.no_grad()
def test_the_ema_teacher_exports_and_loads_in_transformers(tmp_path):
    from transformers import Siglip2Model

    torch.manual_seed(0)
    heads = {"hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 32}
    stage = PretrainStage(
        model=MODEL,
        optim={},
        views={"local_grid": 2},
        losses={"sigmoid": {}, "local_to_global": heads, "masked": heads},
    ).eval()
    stage.loss_enabled.update(local_to_global=True, masked=True)
    for p in stage.teacher.vision.parameters():  # the teacher has drifted from the student
        p.add_(0.1 * torch.randn_like(p))
    _save(stage, tmp_path / "d.ckpt")
    folder = export_main(
        [f"ckpt_path={tmp_path / 'd.ckpt'}", f"out={tmp_path / 'hf_t'}", "which=teacher", "format=siglip2"]
    )
    hf = Siglip2Model.from_pretrained(folder).eval()
    image, text = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 10))
    pv = image.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)
    ref = hf(
        input_ids=text,
        pixel_values=pv,
        pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
        spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
    )
    teacher = stage.teacher.vision(image=image).pooled
    torch.testing.assert_close(teacher, ref.vision_model_output.pooler_output, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(teacher, stage.model.encode_image(image=image).pooled)
    torch.testing.assert_close(stage.model.embed_text(text), ref.text_embeds, rtol=1e-4, atol=1e-5)


def test_the_meta_a_stage_writes_reads_back_field_for_field(tmp_path):
    """`CheckpointMeta`: what `Stage.checkpoint_meta` stores (the dict every earlier format
    holds, key for key) is what `read_checkpoint` and the cheap `read_meta` give back."""
    from siglip2.checkpoint import CHECKPOINT_FORMAT, read_meta

    torch.manual_seed(0)
    stage = PretrainStage(model=MODEL, optim={}, losses=LOSSES).eval()
    _save(stage, tmp_path / "s.ckpt")
    stored = torch.load(tmp_path / "s.ckpt", weights_only=True)["siglip2"]
    assert list(stored) == [
        "format",
        "stage",
        "model",
        "losses",
        "loss_enabled",
        "examples_seen",
        "recipe",
        "init_from",
        "tokenizer",
    ]
    assert stored["format"] == CHECKPOINT_FORMAT == 3 and stored["model"] == stage.model.config.to_dict()
    meta = read_checkpoint(str(tmp_path / "s.ckpt")).meta
    assert meta.to_dict() == stored
    cheap, step = read_meta(tmp_path / "s.ckpt")
    assert cheap.to_dict() == stored and step == 0


def test_resume_rules_are_the_formats(tmp_path):
    """`CheckpointMeta.check_resumable`: another stage, another model, or a format-2 optimiser
    state are refused, each saying what to use instead."""
    from siglip2.checkpoint import CheckpointMeta

    stage = PretrainStage(model=MODEL, optim={}, losses=LOSSES)
    meta = CheckpointMeta.read({"siglip2": stage.checkpoint_meta()})
    meta.check_resumable("pretrain", stage.model.config, has_optimizer_state=True)
    with pytest.raises(ValueError, match="from stage 'pretrain' and this run is stage 'naflex'.*init_from"):
        meta.check_resumable("naflex", stage.model.config, True)
    other = PretrainStage(
        model={**MODEL, "vision": {**MODEL["vision"], "image_size": 32}}, optim={}, losses=LOSSES
    ).model.config
    with pytest.raises(ValueError, match="image_size \\(16 in the checkpoint, 32 here\\)"):
        meta.check_resumable("pretrain", other, True)
    old = CheckpointMeta.read({"siglip2": {**stage.checkpoint_meta(), "format": 2}})
    old.check_resumable("pretrain", stage.model.config, has_optimizer_state=False)  # weights only: fine
    with pytest.raises(ValueError, match="format 2.*init_from=<ckpt> and stage.clock.examples"):
        old.check_resumable("pretrain", stage.model.config, has_optimizer_state=True)


def test_load_model_reads_ours_and_transformers_folders_alike(tmp_path):
    """`load_model(spec)`: our checkpoint's student, or `hf:<folder>` (one prefix parser,
    `split_spec`), as the same model."""
    from siglip2.checkpoint import load_model, split_spec
    from siglip2.export.hf import save_hf

    assert split_spec("hf:/a/b") == ("hf", "/a/b") and split_spec("/a/hf:b.ckpt") == ("ckpt", "/a/hf:b.ckpt")
    torch.manual_seed(0)
    stage = PretrainStage(model=MODEL, optim={}, losses=LOSSES).eval()
    _save(stage, tmp_path / "s.ckpt")
    ours, meta = load_model(str(tmp_path / "s.ckpt"))
    assert meta.stage == "pretrain" and not ours.training
    folder = save_hf(ours, tmp_path / "hf", preprocessing="fixed")
    theirs, hf_meta = load_model(f"hf:{folder}")
    assert hf_meta.stage == "hf"
    image, text = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.encode_image(image=image).embeds, ours.encode_image(image=image).embeds, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(theirs.embed_text(text), ours.embed_text(text), rtol=1e-5, atol=1e-5)
