"""Every released SigLIP 2 layout loads through one path (`siglip2.export.hf.from_hf`, which
`init_from=hf:`, `eval.py ckpt_path=hf:` and the ACID teacher use), issue 29.

At their real shapes on the meta device (no memory, no download): the fixed-resolution
`SiglipModel` releases B/16 (224/256/384/512), L/16 (256/384/512), So400m/14 (224/384),
So400m/16 (256/384/512), g-opt/16 (256/384) and the NaFlex `Siglip2Model` B/16 and So400m/16,
with the widths and depths of `conf/model/*.yaml` (RECIPE.md's released hyperparameters).
Then one tiny random model of each layout kind, saved by transformers and read from disk,
gives transformers' own embeddings and logits."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

from siglip2.export.hf import from_hf, to_hf, to_hf_fixed

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
FIXED = (
    [("b16", s) for s in (224, 256, 384, 512)]
    + [("l16", s) for s in (256, 384, 512)]
    + [("so400m14", s) for s in (224, 384)]
    + [("so400m16", s) for s in (256, 384, 512)]
    + [("g16", s) for s in (256, 384)]
)


def _dims(name: str) -> dict:
    d = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    v, t = d["vision"], d["text"]
    vision = dict(
        hidden_size=v["width"],
        num_hidden_layers=v["depth"],
        intermediate_size=v["mlp_dim"],
        num_attention_heads=v["heads"],
        patch_size=v["patch_size"],
    )
    text = dict(
        hidden_size=t["width"],
        num_hidden_layers=t["depth"],
        intermediate_size=t["mlp_dim"],
        num_attention_heads=t["heads"],
        vocab_size=t["vocab_size"],
        max_position_embeddings=t["max_len"],
        projection_size=d["embed_dim"],
    )
    return dict(vision=vision, text=text)


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("name,size", FIXED)
def test_each_fixed_resolution_release_imports_at_its_real_shape(name, size):
    d = _dims(name)
    with torch.device("meta"):
        hf = SiglipModel(SiglipConfig(vision_config=dict(d["vision"], image_size=size), text_config=d["text"]))
    ours = from_hf(hf)
    v, patch = ours.config.vision, d["vision"]["patch_size"]
    assert (v.image_size, v.patch_size, v.posemb_grid) == (size, patch, size // patch)  # 384 / 14: 27, not 378 px
    assert ours.config.embed_dim == d["text"]["projection_size"] and ours.config.text.width == d["text"]["hidden_size"]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    back = to_hf_fixed(ours)  # the export writes the release's own layout back
    assert back.config.vision_config.image_size == size
    assert _shapes(back) == _shapes(hf)


@pytest.mark.parametrize("name", ["b16", "so400m16"])
def test_each_naflex_release_imports_at_its_real_shape(name):
    d = _dims(name)
    with torch.device("meta"):
        hf = Siglip2Model(Siglip2Config(vision_config=dict(d["vision"], num_patches=256), text_config=d["text"]))
    ours = from_hf(hf)
    assert (ours.config.vision.posemb_grid, ours.config.vision.image_size) == (16, 256)
    assert _shapes(to_hf(ours)) == _shapes(hf)


TINY_TEXT = dict(
    hidden_size=24,
    num_hidden_layers=2,
    intermediate_size=48,
    num_attention_heads=3,
    vocab_size=50,
    max_position_embeddings=10,
)
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, patch_size=4)
KINDS = {
    "fixed": lambda: SiglipModel(
        SiglipConfig(vision_config=dict(TINY_VISION, image_size=16), text_config=dict(TINY_TEXT, projection_size=32))
    ),
    "fixed_not_a_multiple": lambda: SiglipModel(
        SiglipConfig(vision_config=dict(TINY_VISION, image_size=18), text_config=dict(TINY_TEXT, projection_size=32))
    ),
    # g-opt: the text tower narrower than the image tower, its head projecting up to it
    "text_projected_up": lambda: SiglipModel(
        SiglipConfig(
            vision_config=dict(TINY_VISION, hidden_size=48, image_size=16),
            text_config=dict(TINY_TEXT, projection_size=48),
        )
    ),
    "naflex": lambda: Siglip2Model(
        Siglip2Config(vision_config=dict(TINY_VISION, num_patches=16), text_config=dict(TINY_TEXT, projection_size=32))
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@torch.no_grad()
def test_a_tiny_random_model_of_each_layout_loads_from_disk_with_transformers_numbers(kind, tmp_path):
    torch.manual_seed(0)
    hf = KINDS[kind]().eval()
    for n, p in hf.named_parameters():  # off the trivial inits, so a dropped bias or norm would show
        if "norm" in n or "bias" in n or "logit" in n:
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    text = torch.randint(0, 50, (3, 10))
    if kind == "naflex":
        image = torch.randn(3, 3, 16, 16)
        pv = image.reshape(3, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, 48)
        ref = hf(
            input_ids=text,
            pixel_values=pv,
            pixel_attention_mask=torch.ones(3, 16, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4]] * 3),
        )
    else:
        size = hf.config.vision_config.image_size
        image = torch.randn(3, 3, size, size)
        ref = hf(input_ids=text, pixel_values=image)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.encode_image(image=image).pooled, ref.vision_model_output.pooler_output, **tol)
    torch.testing.assert_close(ours.encode_text(text), ref.text_model_output.pooler_output, **tol)
    o = ours(image, text)
    torch.testing.assert_close(
        o["image_emb"] @ o["text_emb"].t() * o["logit_scale"] + o["logit_bias"], ref.logits_per_image, **tol
    )
