"""Resolution adaptation and starting from released weights [P §2.4.1; issue 14].

References: big_vision's FlexiViT `resample_patchemb` (transcribed in numpy below, with
`tf.image.resize(..., "bilinear")`'s half-pixel bilinear written out), `scipy.ndimage.zoom`
(big_vision's ViT posemb loader), transformers' `Siglip2Model` (a tiny random one saved to
disk); the end-to-end path a user runs (pretrain -> frac_0.95.ckpt -> stage=resadapt):
tests/integration/test_resadapt_integration.py.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siglip2.model import build_model
from siglip2.model.adapt import adapt_vision_weights
from siglip2.model.posemb import resample_patch_embed, resize_posemb
from siglip2.model.two_tower import SigLIP2Config


# ---------------------------------------------------------------- references
def _tf_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): TF2 `tf.image.resize(method="bilinear")` along one axis (half-pixel
    centres, no antialias): source = (o + 0.5) * n_in / n_out - 0.5, neighbours clamped."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        lo = math.floor(src)
        frac = src - lo
        m[o, min(max(lo, 0), n_in - 1)] += 1 - frac
        m[o, min(max(lo + 1, 0), n_in - 1)] += frac
    return m


def _big_vision_resample_patchemb(kernel: np.ndarray, new: int) -> np.ndarray:
    """big_vision `proj/flexi/vit.py resample_patchemb` on an HWIO kernel (p, p, C, W):
    resize matrix from resized basis vectors, pinv of its transpose, applied per (C, W)."""
    p = kernel.shape[0]
    mat = []
    for i in range(p * p):
        basis = np.zeros((p, p))
        basis[np.unravel_index(i, (p, p))] = 1.0
        one = _tf_bilinear_matrix(p, new)
        mat.append((one @ basis @ one.T).reshape(-1))  # separable bilinear resize of the basis
    resize_mat = np.stack(mat).T  # (new*new, p*p)
    pinv = np.linalg.pinv(resize_mat.T)  # (new*new, p*p)
    flat = kernel.reshape(p * p, -1)
    return (pinv @ flat).reshape(new, new, *kernel.shape[2:])


@pytest.mark.parametrize("old,new", [(4, 6), (8, 16), (6, 3), (16, 14)])
def test_pi_resize_equals_big_vision_formula(old, new):
    rng = np.random.default_rng(old * 100 + new)
    width, channels = 5, 3
    hwio = rng.normal(size=(old, old, channels, width))
    want = _big_vision_resample_patchemb(hwio, new)
    # ours: the patch Linear (W, p*p*C), flattened (ph, pw, C) as HF's patches
    linear = torch.tensor(hwio.transpose(3, 0, 1, 2).reshape(width, -1), dtype=torch.float64)
    got = resample_patch_embed(linear, new, channels).numpy().reshape(width, new, new, channels).transpose(1, 2, 3, 0)
    # timm builds the resize matrix and its pinv in float32: ~2e-5 from the float64 reference at
    # 16 -> 14; another rule (antialias, bicubic) is ~1e-1 away
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pi_resize_upsampled_patch_gives_the_same_token():
    """PI-resize's promise, exact when upsampling: <resize(x), w_new> = <x, w_old>."""
    torch.manual_seed(0)
    w = torch.randn(7, 4 * 4 * 3, dtype=torch.float64)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    up = F.interpolate(x, size=(10, 10), mode="bilinear", align_corners=False)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(len(t), -1)
    # float32 pinv inside timm: ~6e-6 on tokens of size ~5
    torch.testing.assert_close(flat(up) @ resample_patch_embed(w, 10).t(), flat(x) @ w.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("old,new", [(4, 7), (8, 12), (16, 32), (8, 5)])
def test_posemb_bv_zoom_equals_scipy_zoom_and_hf_is_hf(old, new):
    from scipy import ndimage
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    torch.manual_seed(old + new)
    table = torch.randn(old, old, 6)
    zoomed = ndimage.zoom(table.numpy().astype(np.float64), (new / old, new / old, 1), order=1)
    got = resize_posemb(table.reshape(old * old, 6), (new, new), "bv_zoom")
    np.testing.assert_allclose(got.reshape(new, new, 6).numpy(), zoomed, rtol=1e-5, atol=1e-5)
    hf = Siglip2VisionEmbeddings.resize_positional_embeddings(table, torch.tensor([[new, new]]), max_length=new * new)
    torch.testing.assert_close(resize_posemb(table, (new, new), "hf"), hf[0], atol=1e-6, rtol=1e-6)
    assert (got - hf[0]).abs().max() > 0.05  # the two rules really differ: the option matters
    with pytest.raises(ValueError, match="bv_zoom"):
        resize_posemb(table, (new, new), "nearest")


# ---------------------------------------------------------------- adapting a model's weights
SIZES = dict(
    name="t",
    embed_dim=32,
    vision=dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=8, posemb_grid=4, image_size=32),
    text=dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10),
)


def _smooth_image(size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: one low-frequency pattern per channel."""
    t = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack(
        [torch.sin(2.0 * x + 1.0) * torch.cos(1.5 * y), torch.cos(2.5 * y - 0.5 * x), 0.8 * torch.sin(1.2 * (x + y))]
    )[None]


@torch.no_grad()
def test_patch_change_keeps_the_embedding_of_a_smooth_image():
    """/8 -> /4 with the image halved (same 4x4 grid): PI-resize keeps the pooled embedding;
    resizing the kernel like an image (no pseudo-inverse) does not."""
    torch.manual_seed(0)
    src = build_model(SIZES).eval()
    image = _smooth_image(32)
    small = F.interpolate(image, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    before = src.encode_image(image=image).embeds
    target_sizes = {**SIZES, "vision": {**SIZES["vision"], "patch_size": 4, "image_size": 16}}
    target = SigLIP2Config.from_dict(target_sizes)
    state, notes = adapt_vision_weights({f"model.{k}": v for k, v in src.state_dict().items()}, src.config, target)
    assert any("patch 8 -> 4" in n for n in notes) and not any("position table" in n for n in notes)
    dst = build_model(target_sizes).eval()
    dst.load_state_dict({k[len("model.") :]: v for k, v in state.items()})
    after = dst.encode_image(image=small).embeds
    cos_pi = float((before * after).sum())
    # the naive alternative: the 8x8 kernel bilinearly shrunk to 4x4 like an image
    w = src.vision_model.embeddings.patch_embedding.weight.reshape(32, 8, 8, 3).permute(0, 3, 1, 2)
    naive = F.interpolate(w, size=(4, 4), mode="bilinear", antialias=True).permute(0, 2, 3, 1).reshape(32, -1)
    with torch.no_grad():
        dst.vision_model.embeddings.patch_embedding.weight.copy_(naive)
    cos_naive = float((before * dst.encode_image(image=small).embeds).sum())
    print(f"cosine to the /8 embedding: PI-resize {cos_pi:.4f}, naive kernel resize {cos_naive:.4f}")
    assert cos_pi > 0.99 and cos_pi - cos_naive > 0.05, (cos_pi, cos_naive)


def test_adapting_refuses_another_architecture():
    src = SigLIP2Config.from_dict(SIZES)
    for field, value in (("depth", 3), ("width", 48)):
        other = SigLIP2Config.from_dict(
            {**SIZES, "vision": {**SIZES["vision"], field: value}, "embed_dim": 48 if field == "width" else 32}
        )
        with pytest.raises(ValueError, match=f"vision.{field} \\({SIZES['vision'][field]} in the checkpoint"):
            adapt_vision_weights({}, src, other)
    other = SigLIP2Config.from_dict({**SIZES, "text": {**SIZES["text"], "vocab_size": 60}})
    with pytest.raises(ValueError, match="text.vocab_size"):
        adapt_vision_weights({}, src, other)


# ---------------------------------------------------------------- init_from=hf:
HF_SIZES = dict(
    name="t",
    embed_dim=32,
    vision=dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4, posemb_grid=4, image_size=16),
    text=dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10),
)
HEADS = {"hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 32}


def _hf_folder(tmp_path):
    """A tiny random transformers Siglip2Model on disk (safetensors + config), off its init."""
    from transformers import Siglip2Config, Siglip2Model

    v, t = HF_SIZES["vision"], HF_SIZES["text"]
    cfg = Siglip2Config(
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
            projection_size=32,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
    )
    torch.manual_seed(1)
    hf = Siglip2Model(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name or "logit" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return hf, tmp_path / "hf"


def _hf_embeds(hf, image: torch.Tensor, text: torch.Tensor, patch: int):
    b, c, h, w = image.shape
    pv = image.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    pv = pv.reshape(b, (h // patch) * (w // patch), patch * patch * c)
    out = hf(
        input_ids=text,
        pixel_values=pv,
        pixel_attention_mask=torch.ones(b, pv.shape[1], dtype=torch.long),
        spatial_shapes=torch.tensor([[h // patch, w // patch]] * b),
    )
    return out.image_embeds, out.text_embeds


@torch.no_grad()
def test_init_from_hf_folder_loads_towers_and_starts_the_rest_fresh(tmp_path, caplog):
    from stages.pretrain import PretrainStage

    hf, folder = _hf_folder(tmp_path)
    torch.manual_seed(0)
    stage = PretrainStage(
        model=HF_SIZES,
        optim={},
        views={"local_grid": 2},
        losses={"sigmoid": {}, "local_to_global": HEADS, "masked": HEADS},
    )
    heads_before = {k: v.clone() for k, v in stage.losses.state_dict().items()}
    with caplog.at_level("INFO"):
        stage.load_weights(f"hf:{folder}")
    assert "starting fresh (never released): losses.local_to_global, losses.masked" in caplog.text
    image, text = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randint(0, 50, (2, 10))
    ref_img, ref_txt = _hf_embeds(hf, image, text, 4)
    torch.testing.assert_close(stage.model.encode_image(image=image).embeds, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stage.model.embed_text(text), ref_txt, atol=1e-5, rtol=1e-5)
    assert float(stage.model.logit_bias) == pytest.approx(float(hf.logit_bias))
    assert float(stage.model.logit_scale) == pytest.approx(float(hf.logit_scale))
    for k, v in stage.losses.state_dict().items():  # never released: left as built
        assert torch.equal(v, heads_before[k]), k
    teacher = stage.teacher.vision.state_dict()  # the teacher starts as the loaded student
    for k, v in stage.model.vision_model.state_dict().items():
        assert torch.equal(teacher[k], v), k
    assert stage.checkpoint_meta()["init_from"]["path"] == f"hf:{os.path.abspath(folder)}"


@torch.no_grad()
def test_hf_to_ours_to_export_to_hf_is_identical(tmp_path):
    from transformers import Siglip2Model

    from siglip2.export import from_hf, save_hf

    hf, folder = _hf_folder(tmp_path)
    ours = from_hf(folder)
    back = Siglip2Model.from_pretrained(save_hf(ours, tmp_path / "again")).eval()
    image, text = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randint(0, 50, (3, 10))
    for a, b in zip(_hf_embeds(hf, image, text, 4), _hf_embeds(back, image, text, 4)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@torch.no_grad()
def test_init_from_hf_adapts_to_this_runs_resolution_and_refuses_other_sizes(tmp_path):
    from stages.resadapt import ResAdaptStage

    hf, folder = _hf_folder(tmp_path)
    big = {**HF_SIZES, "vision": {**HF_SIZES["vision"], "image_size": 24}}
    stage = ResAdaptStage(model=big, optim={}, losses={"sigmoid": {}})
    assert stage.model.config.vision.posemb_grid == 6  # auto: 24 px / patch 4
    stage.load_weights(f"hf:{folder}")
    image = torch.rand(2, 3, 24, 24) * 2 - 1
    # the table baked at 6x6 equals HF resizing its 4x4 table on the fly for a 6x6 grid
    ref, _ = _hf_embeds(hf, image, torch.randint(0, 50, (2, 10)), 4)
    torch.testing.assert_close(stage.model.encode_image(image=image).embeds, ref, atol=1e-5, rtol=1e-5)
    from stages.pretrain import PretrainStage

    longer_text = {**HF_SIZES, "text": {**HF_SIZES["text"], "max_len": 12}}
    with pytest.raises(ValueError, match=r"text.max_len \(10 in the HF model"):
        PretrainStage(model=longer_text, optim={}, losses={"sigmoid": {}}).load_weights(f"hf:{folder}")
