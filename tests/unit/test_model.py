"""Model tests: released-layout parity against transformers' Siglip2 (random tiny, built offline)."""

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import Siglip2Config, Siglip2Model
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

from siglip2.model import build_model, posemb_for_batch, resample_patch_embed

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
TOL = dict(atol=1e-5, rtol=1e-5)


def hf_config_from_sizes(d: dict) -> Siglip2Config:
    """Written independently of `siglip2.export.hf.hf_config`, so the tests do not grade themselves."""
    v, t = d["vision"], d["text"]
    return Siglip2Config(
        vision_config=dict(
            hidden_size=v["width"],
            num_hidden_layers=v["depth"],
            intermediate_size=v["mlp_dim"],
            num_attention_heads=v["heads"],
            patch_size=v["patch_size"],
            num_patches=v["posemb_grid"] ** 2,
        ),
        text_config=dict(
            hidden_size=t["width"],
            num_hidden_layers=t["depth"],
            intermediate_size=t["mlp_dim"],
            num_attention_heads=t["heads"],
            vocab_size=t["vocab_size"],
            max_position_embeddings=t["max_len"],
            projection_size=d.get("embed_dim") or v["width"],
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
    )


@pytest.mark.parametrize("name", ["b16", "l16", "so400m14", "so400m16", "g16"])
def test_large_configs_match_hf_on_meta(name):
    d = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert d["name"] == name and d["text"]["vocab_size"] == 256000 and d["text"]["max_len"] == 64
    with torch.device("meta"):
        ours = build_model(d)
        hf = Siglip2Model(hf_config_from_sizes(d))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(hf)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(hf)


def test_tiny_yaml_builds_once_vocab_is_known():
    d = yaml.safe_load((CONF / "tiny.yaml").read_text())
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(d)
    d["text"]["vocab_size"] = 1000
    m = build_model(d)
    v = d["vision"]
    assert v["image_size"] // v["patch_size"] == v["posemb_grid"]
    assert sum(p.numel() for p in m.parameters()) < 5e6


def test_embed_dim_must_be_vision_width():
    d = yaml.safe_load((CONF / "tiny.yaml").read_text())
    d["text"]["vocab_size"], d["embed_dim"] = 100, 64
    with pytest.raises(ValueError, match="embed_dim"):
        build_model(d)


# ---------------------------------------------------------------- tiny random parity with HF
SIZES = dict(
    name="t",
    embed_dim=32,
    vision=dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4, posemb_grid=4, image_size=16),
    text=dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10),
)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = Siglip2Model._from_config(hf_config_from_sizes(SIZES), attn_implementation="eager").eval()
    with torch.no_grad():  # move LayerNorms, biases and the logit params off their trivial inits
        for n, p in hf.named_parameters():
            if "norm" in n or "bias" in n or "logit" in n:
                p.add_(0.2 * torch.randn_like(p))
    ours = build_model(SIZES).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def hf_patches(images, p, max_len):
    """Patchify + pad exactly as Siglip2ImageProcessor does (no resize)."""
    pv, mask, shapes = [], [], []
    for im in images:
        x = convert_image_to_patches(im, p)
        pv.append(F.pad(x, (0, 0, 0, max_len - len(x))))
        mask.append(torch.arange(max_len) < len(x))
        shapes.append((im.shape[1] // p, im.shape[2] // p))
    return torch.stack(pv), torch.stack(mask), torch.tensor(shapes)


@pytest.mark.parametrize("hw", [(16, 16), (24, 12)])  # the table's own grid, and a resized one
@torch.no_grad()
def test_fixed_grid_parity(pair, hw):
    ours, hf = pair
    image = torch.randn(3, 3, *hw)
    text = torch.randint(0, 50, (3, 10))
    n = (hw[0] // 4) * (hw[1] // 4)
    pv, mask, shapes = hf_patches(image, 4, n)
    ref = hf(input_ids=text, pixel_values=pv, pixel_attention_mask=mask.long(), spatial_shapes=shapes)
    img = ours.encode_image(image=image)
    assert img.token_mask is None
    torch.testing.assert_close(img.tokens, ref.vision_model_output.last_hidden_state, **TOL)
    torch.testing.assert_close(img.pooled, ref.vision_model_output.pooler_output, **TOL)
    torch.testing.assert_close(ours.encode_text(text), ref.text_model_output.pooler_output, **TOL)
    out = ours(image, text)
    logits = out["image_emb"] @ out["text_emb"].t() * out["logit_scale"] + out["logit_bias"]
    torch.testing.assert_close(logits, ref.logits_per_image, **TOL)


@torch.no_grad()
def test_naflex_parity_with_padding(pair):
    ours, hf = pair
    images = [torch.randn(3, 12, 20), torch.randn(3, 16, 16)]  # grids 3x5 (15) and 4x4 (16)
    pv, mask, shapes = hf_patches(images, 4, 18)
    ref = hf.vision_model(pixel_values=pv, pixel_attention_mask=mask.long(), spatial_shapes=shapes)
    out = ours.encode_image(patches=pv, patch_valid=mask, spatial_shapes=shapes)
    torch.testing.assert_close(out.pooled, ref.pooler_output, **TOL)
    torch.testing.assert_close(out.tokens[mask], ref.last_hidden_state[mask], **TOL)
    assert torch.equal(out.token_mask, mask)
    # each image alone, unpadded, gives the same embedding: padding is really ignored
    for i, im in enumerate(images):
        torch.testing.assert_close(ours.encode_image(image=im[None]).pooled[0], out.pooled[i], **TOL)
    # (y, x) coordinates instead of spatial_shapes, patches shuffled: same result
    coords = torch.zeros(2, 18, 2, dtype=torch.long)
    for i, (h, w) in enumerate(shapes.tolist()):
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        coords[i, : h * w] = yx
    perm = torch.randperm(18)
    shuf = ours.encode_image(patches=pv[:, perm], patch_coord=coords[:, perm], patch_valid=mask[:, perm])
    torch.testing.assert_close(shuf.pooled, out.pooled, **TOL)


def test_posemb_resize_equals_hf():
    torch.manual_seed(0)
    table = torch.randn(16 * 16, 8)
    shapes = torch.tensor([[16, 16], [14, 14], [24, 24], [7, 30], [32, 8], [1, 1], [14, 14]])
    ref = Siglip2VisionEmbeddings.resize_positional_embeddings(table.reshape(16, 16, 8), shapes, max_length=576)
    ours = posemb_for_batch(table, shapes, 576)
    for i, (h, w) in enumerate(shapes.tolist()):
        torch.testing.assert_close(ours[i, : h * w], ref[i, : h * w], atol=1e-6, rtol=1e-6)


def test_map_text_pooling():
    d = {**SIZES, "text": {**SIZES["text"], "pool": "map"}}
    m = build_model(d)
    assert any(k.startswith("text_model.map_head.") for k in m.state_dict())
    text = torch.randint(0, 50, (3, 10))
    assert m.encode_text(text).shape == (3, 32)
    out = m(torch.randn(3, 3, 16, 16), text)
    assert out["text_emb"].shape == out["image_emb"].shape == (3, 32)


def test_masked_patch_hook():
    torch.manual_seed(0)
    m = build_model(SIZES)
    image = torch.randn(2, 3, 16, 16)
    token = torch.zeros(32, requires_grad=True)
    none = torch.zeros(2, 16, dtype=torch.bool)
    base = m.encode_image(image=image).pooled
    torch.testing.assert_close(m.encode_image(image=image, masked_patches=none, mask_token=token).pooled, base)
    half = torch.rand(2, 16) < 0.5
    out = m.encode_image(image=image, masked_patches=half, mask_token=token)
    assert not torch.allclose(out.pooled, base)
    out.tokens.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_init_and_logit_params():
    m = build_model(SIZES)
    assert m.logit_scale.item() == pytest.approx(math.log(10)) and m.logit_bias.item() == -10
    out = m(torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 10)))
    assert out["logit_scale"].item() == pytest.approx(10.0)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_logit_init_is_configurable_and_checked():
    """Small-batch runs set b near -log(batch): at init every pair then sits at the loss's
    balance point sigma(b) ~ 1/batch, the analytic optimum for uninformative embeddings."""
    m = build_model({**SIZES, "logit_scale_init": 5.0, "logit_bias_init": -math.log(128)})
    assert m.logit_scale.exp().item() == pytest.approx(5.0)
    assert m.logit_bias.item() == pytest.approx(-math.log(128))
    with pytest.raises(ValueError, match="logit_scale_init"):
        build_model({**SIZES, "logit_scale_init": -math.log(10)})


def test_flexivit_patch_resize_preserves_tokens():
    """PI-resize: a patch upsampled 4->8 against the resized kernel gives the old token."""
    torch.manual_seed(0)
    w = torch.randn(32, 4 * 4 * 3)
    x = torch.randn(10, 3, 4, 4)
    x_up = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(len(t), -1)  # (ph, pw, C) as the Linear expects
    w8 = resample_patch_embed(w, 8)
    assert w8.shape == (32, 8 * 8 * 3)
    torch.testing.assert_close(flat(x_up) @ w8.t(), flat(x) @ w.t(), atol=1e-4, rtol=1e-4)
    # the tower helper: same tokens from the upsampled-per-patch image after adapt()
    m = build_model(SIZES).eval()
    img = torch.randn(1, 3, 16, 16)
    before = m.encode_image(image=img).pooled
    patches = img.reshape(1, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(16, 3, 4, 4)
    up = F.interpolate(patches, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    big = up.reshape(1, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 32, 32)
    m.vision_model.adapt(patch_size=8)
    assert m.config.vision.patch_size == 8
    torch.testing.assert_close(m.encode_image(image=big).pooled, before, atol=1e-4, rtol=1e-4)


def test_adapt_posemb_grid_matches_on_the_fly_resize():
    m = build_model(SIZES).eval()
    img = torch.randn(2, 3, 24, 24)  # 6x6 grid: the 4x4 table is resized on the fly
    before = m.encode_image(image=img).pooled
    m.vision_model.adapt(posemb_grid=6)
    assert m.vision_model.embeddings.position_embedding.weight.shape == (36, 32)
    torch.testing.assert_close(m.encode_image(image=img).pooled, before, **TOL)
