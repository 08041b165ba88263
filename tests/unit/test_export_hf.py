"""Export to a transformers Siglip2 folder and back; loaded by transformers itself."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import Siglip2ImageProcessor, Siglip2Model

from siglip2.export import from_hf, save_hf, to_hf
from siglip2.model import build_model

SIZES = dict(
    name="t",
    embed_dim=32,
    vision=dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4, posemb_grid=4, image_size=16),
    text=dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10),
)


def _model(**text):
    torch.manual_seed(0)
    m = build_model({**SIZES, "text": {**SIZES["text"], **text}}).eval()
    with torch.no_grad():
        m.logit_bias.fill_(-3.0)
    return m


@torch.no_grad()
def test_save_hf_loads_in_transformers(tmp_path):
    m = _model()
    out = save_hf(m, tmp_path / "hf")  # the tokenizer's part: tests/unit/test_export_transformers.py
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    junk = tmp_path / "tok"
    junk.mkdir()
    (junk / "tokenizer.json").write_text("{}")  # not a tokenizer: refused, never copied as is
    with pytest.raises(ValueError, match="could not load a Hugging Face tokenizer"):
        save_hf(m, tmp_path / "junk", tokenizer_dir=junk)
    hf = Siglip2Model.from_pretrained(out).eval()
    proc = Siglip2ImageProcessor.from_pretrained(out)
    assert proc.patch_size == 4 and proc.max_num_patches == 16

    image, text = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 10))
    pv = image.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)
    ref = hf(
        input_ids=text,
        pixel_values=pv,
        pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
        spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
    )
    torch.testing.assert_close(m.encode_image(image=image).pooled, ref.vision_model_output.pooler_output)
    torch.testing.assert_close(m.encode_text(text), ref.text_model_output.pooler_output)
    o = m(image, text)
    torch.testing.assert_close(
        o["image_emb"] @ o["text_emb"].t() * o["logit_scale"] + o["logit_bias"], ref.logits_per_image
    )


def test_round_trip(tmp_path):
    m = _model()
    back = from_hf(to_hf(m))
    assert back.config == m.config
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    save_hf(m, tmp_path)
    again = from_hf(tmp_path, image_size=16)
    assert again.config == m.config
    assert all(torch.equal(sd[k], again.state_dict()[k]) for k in sd)


def test_map_text_pool_cannot_export():
    with pytest.raises(ValueError, match="pool"):
        to_hf(_model(pool="map"))


def _pictures():
    """Non-square and square RGB pictures with structure at every scale (a smooth field plus blocks)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for w, h in [(128, 64), (256, 64), (64, 192), (96, 96)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], -1) * 90 + 128
        base += rng.normal(0, 20, size=base.shape)
        out.append(Image.fromarray(base.clip(0, 255).astype("uint8")))
    return out


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@torch.no_grad()
def test_fixed_resolution_export_preprocesses_as_training(tmp_path):
    """A fixed-resolution stage's export is a `SiglipModel` whose `SiglipImageProcessor`
    squashes to the square training size: on 2:1, 4:1 and 1:3 images its embeddings equal ours
    after our training transform (the NaFlex processor, which keeps the aspect, did not:
    cosine 0.83-0.89 in issue 18)."""
    from transformers import AutoImageProcessor, AutoModel

    from siglip2.data.transforms import ImageTransform

    m = _model()
    out = save_hf(m, tmp_path / "fixed", preprocessing="fixed")
    hf, proc = AutoModel.from_pretrained(out).eval(), AutoImageProcessor.from_pretrained(out)
    assert type(hf).__name__ == "SiglipModel"
    pics = _pictures()
    ours = m.encode_image(image=torch.stack([ImageTransform(16)(p, None)[0] for p in pics])).embeds
    pv = proc(images=pics, return_tensors="pt")["pixel_values"]
    assert pv.shape == (4, 3, 16, 16)
    theirs = torch.nn.functional.normalize(_image_features(hf, pixel_values=pv), dim=-1)
    assert float(_cos(ours, theirs).min()) > 0.999, _cos(ours, theirs)
    # and the weights come back: fixed export -> ours, same numbers
    back = from_hf(out)
    sd = m.state_dict()
    assert all(torch.allclose(sd[k], v) for k, v in back.state_dict().items())


@torch.no_grad()
def test_naflex_export_preprocesses_as_naflex_evaluation(tmp_path):
    """A NaFlex stage's export: `Siglip2ImageProcessor` + `Siglip2Model` with
    `pixel_attention_mask` and `spatial_shapes` give our NaFlex evaluation's embeddings."""
    from transformers import AutoImageProcessor, AutoModel

    from siglip2.eval.suite import _encode  # the NaFlex evaluation's encoder

    m = _model()
    out = save_hf(m, tmp_path / "naflex", preprocessing="naflex")
    hf, proc = AutoModel.from_pretrained(out).eval(), AutoImageProcessor.from_pretrained(out)
    assert type(hf).__name__ == "Siglip2Model"
    from siglip2.data.naflex import pad_patches, patchify_image, resize_for_max_patches
    from torchvision.transforms.v2 import functional as TF

    pics = _pictures()
    batch = pad_patches([patchify_image(resize_for_max_patches(TF.pil_to_tensor(p), 4, 16), 4) for p in pics], 16)
    ours = _encode(m, batch, "cpu").embeds
    enc = proc(images=pics, return_tensors="pt")
    assert torch.equal(enc["spatial_shapes"], batch["spatial_shapes"])
    theirs = torch.nn.functional.normalize(
        _image_features(
            hf,
            pixel_values=enc["pixel_values"],
            pixel_attention_mask=enc["pixel_attention_mask"],
            spatial_shapes=enc["spatial_shapes"],
        ),
        dim=-1,
    )
    assert float(_cos(ours, theirs).min()) > 0.999, _cos(ours, theirs)


def _image_features(hf, **kw):
    out = hf.get_image_features(**kw)
    return out if torch.is_tensor(out) else out.pooler_output


def test_export_cli_picks_the_processor_from_the_checkpoints_stage(tmp_path, monkeypatch):
    """`python -m siglip2.export`: fixed-resolution stages -> SiglipModel, naflex -> Siglip2Model."""
    import json

    from siglip2.checkpoint import Checkpoint
    from siglip2.export import __main__ as cli

    m = _model()
    for stage, kind in (("pretrain", "siglip"), ("resadapt", "siglip"), ("naflex", "siglip2")):
        ck = Checkpoint(
            path="x",
            stage=stage,
            model_config=m.config,
            loss_configs={},
            state_dict={f"model.{k}": v for k, v in m.state_dict().items()},
        )
        monkeypatch.setattr("siglip2.checkpoint.read_checkpoint", lambda path, ck=ck: ck)
        folder = cli.main([f"ckpt_path={tmp_path}/{stage}.ckpt", f"out={tmp_path / stage}"])
        assert json.loads((folder / "config.json").read_text())["model_type"] == kind, stage


def test_export_cli_writes_the_checkpoints_tokenizer_as_it_was_trained(tmp_path, monkeypatch):
    """The CLI writes the recorded tokenizer with its recorded lower-casing: a checkpoint trained
    cased (`tokenizer.lowercase=false`) exports a tokenizer that keeps case, and transformers'
    AutoProcessor gives the training ids."""
    import random

    from transformers import AutoProcessor

    from siglip2.checkpoint import Checkpoint
    from siglip2.data.tokenizer import build_tokenizer, tokenizer_fingerprint, train_sentencepiece
    from siglip2.export import __main__ as cli

    rng = random.Random(0)
    words = "a the Red blue GREEN circle Square photo of on left right".split()
    sp = train_sentencepiece(
        [" ".join(rng.choice(words) for _ in range(6)) for _ in range(200)],
        str(tmp_path / "sp" / "tok"),
        vocab_size=400,
    )
    texts = ["A Red Circle", "a red circle", "GREEN square on the LEFT"]
    for lowercase in (True, False):
        tok = build_tokenizer(sp, length=10, lowercase=lowercase)
        m = _model(vocab_size=tok.vocab_size)
        ck = Checkpoint(
            path="x",
            stage="pretrain",
            model_config=m.config,
            loss_configs={},
            state_dict={f"model.{k}": v for k, v in m.state_dict().items()},
            meta={"tokenizer": {**tokenizer_fingerprint(sp), "lowercase": lowercase}},
        )
        monkeypatch.setattr("siglip2.checkpoint.read_checkpoint", lambda path, ck=ck: ck)
        folder = cli.main([f"ckpt_path={tmp_path}/x.ckpt", f"out={tmp_path / str(lowercase)}"])
        ids = AutoProcessor.from_pretrained(folder)(text=texts, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, tok(texts)), lowercase
        assert torch.equal(ids[0], ids[1]) == lowercase


@torch.no_grad()
def test_an_image_size_that_is_not_a_multiple_of_the_patch_is_kept_as_released(tmp_path):
    """google/siglip2-so400m-patch14-384 in miniature: a `SiglipModel` at 18 px with 4-px
    patches (the released 384 / 14) sees a 4 x 4 grid, its last 2 px unseen (a VALID conv).
    The import keeps 18 px (not 16), gives transformers' embeddings on 18 px inputs, resolution
    adaptation to such a size keeps that grid, and the fixed export writes 18 px back."""
    from transformers import AutoImageProcessor, SiglipConfig, SiglipModel

    from siglip2.data.transforms import ImageTransform
    from siglip2.export.hf import to_hf_fixed
    from stages.resadapt import _with_grid

    torch.manual_seed(0)
    t, v = SIZES["text"], SIZES["vision"]
    cfg = SiglipConfig(
        text_config=dict(
            vocab_size=t["vocab_size"],
            hidden_size=t["width"],
            intermediate_size=t["mlp_dim"],
            num_hidden_layers=t["depth"],
            num_attention_heads=t["heads"],
            max_position_embeddings=t["max_len"],
            projection_size=32,
        ),
        vision_config=dict(
            hidden_size=v["width"],
            intermediate_size=v["mlp_dim"],
            num_hidden_layers=v["depth"],
            num_attention_heads=v["heads"],
            patch_size=4,
            image_size=18,
        ),
    )
    hf = SiglipModel(cfg).eval()
    hf.save_pretrained(tmp_path / "released")
    ours = from_hf(tmp_path / "released")
    assert ours.config.vision.image_size == 18 and ours.config.vision.posemb_grid == 4
    image, text = torch.randn(3, 3, 18, 18), torch.randint(0, 50, (3, 10))
    theirs = _image_features(hf, pixel_values=image)
    out = ours.encode_image(image=image)
    assert out.tokens.shape[1] == 16
    torch.testing.assert_close(out.pooled, theirs, rtol=1e-5, atol=1e-5)
    ref = hf(input_ids=text, pixel_values=image)
    o = ours(image, text)
    torch.testing.assert_close(
        o["image_emb"] @ o["text_emb"].t() * o["logit_scale"] + o["logit_bias"],
        ref.logits_per_image,
        rtol=1e-5,
        atol=1e-5,
    )
    # the unseen rows and columns change nothing
    shifted = image.clone()
    shifted[..., 16:, :] = 5.0
    shifted[..., :, 16:] = -5.0
    torch.testing.assert_close(ours.encode_image(image=shifted).pooled, out.pooled)
    # resolution adaptation to a size that is not a multiple: the grid is size // patch
    assert (
        _with_grid({"vision": {"image_size": 18, "patch_size": 4, "posemb_grid": 2}}, "auto")["vision"]["posemb_grid"]
        == 4
    )
    # and back: a SiglipModel at 18 px whose processor squashes to 18 px, the same numbers
    back = to_hf_fixed(ours)
    assert back.config.vision_config.image_size == 18
    torch.testing.assert_close(_image_features(back, pixel_values=image), theirs, rtol=1e-5, atol=1e-5)
    out_dir = save_hf(ours, tmp_path / "export", preprocessing="fixed")
    proc = AutoImageProcessor.from_pretrained(out_dir)
    pics = _pictures()
    pv = proc(images=pics, return_tensors="pt")["pixel_values"]
    assert pv.shape == (4, 3, 18, 18)
    mine = ours.encode_image(image=torch.stack([ImageTransform(18)(p, None)[0] for p in pics])).embeds
    assert (
        float(_cos(mine, torch.nn.functional.normalize(_image_features(back, pixel_values=pv), dim=-1)).min()) > 0.999
    )
