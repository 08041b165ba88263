"""Conversion to and from transformers, in the two layouts Google released SigLIP 2 in.

- NaFlex models: `transformers.Siglip2Model` + `Siglip2ImageProcessor` (native aspect ratio,
  up to `max_num_patches`). Our state_dict already has its names and shapes: conversion is
  the right `Siglip2Config` and a strict `load_state_dict`.
- Fixed-resolution models (e.g. `google/siglip2-base-patch16-224`): `transformers.SiglipModel`
  + `SiglipImageProcessor` (a square resize, as they were trained). The weights differ only in
  the patch embedding (a Conv2d instead of a Linear over (row, column, channel) patches) and a
  position table of exactly the image's grid.

`save_hf(..., preprocessing=)` writes the one whose processor reproduces the training
transform of the stage that made the weights (`python -m siglip2.export` picks it from the
checkpoint's stage). What HF cannot represent is refused rather than silently dropped: a
MAP-pooled text tower (`pool='map'`).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..model import SigLIP2, SigLIP2Config, TextConfig, VisionConfig

# Files a tokenizer folder may hold that belong in the exported folder (never config/weights).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "spiece.model", "added_tokens.json")


def hf_config(cfg: SigLIP2Config):
    """Our config -> `transformers.Siglip2Config`."""
    from transformers import Siglip2Config, Siglip2TextConfig, Siglip2VisionConfig

    if cfg.text.pool != "last":
        raise ValueError(f"text pool {cfg.text.pool!r} has no transformers equivalent (HF pools the last token)")
    v, t = cfg.vision, cfg.text
    vision = Siglip2VisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
        num_channels=v.channels, patch_size=v.patch_size, num_patches=v.posemb_grid**2,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    text = Siglip2TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
        num_attention_heads=t.heads, max_position_embeddings=t.max_len, projection_size=cfg.embed_dim,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)  # HF defaults are CLIP ids; ours live in the tokenizer
    return Siglip2Config(text_config=text.to_dict(), vision_config=vision.to_dict())


def our_config(hf_cfg, image_size: int | None = None) -> SigLIP2Config:
    """`transformers.Siglip2Config` -> ours. HF does not record an image size: default grid * patch."""
    v, t = hf_cfg.vision_config, hf_cfg.text_config
    for c in (v, t):
        if c.hidden_act != "gelu_pytorch_tanh" or abs(c.layer_norm_eps - 1e-6) > 1e-12:
            raise ValueError(f"unsupported {type(c).__name__}: act {c.hidden_act}, eps {c.layer_norm_eps}")
    grid = math.isqrt(v.num_patches)
    if grid * grid != v.num_patches:
        raise ValueError(f"num_patches {v.num_patches} is not a square grid")
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    return SigLIP2Config(
        vision=VisionConfig(width=v.hidden_size, depth=v.num_hidden_layers, mlp_dim=v.intermediate_size,
                            heads=v.num_attention_heads, patch_size=patch, posemb_grid=grid,
                            image_size=image_size or grid * patch, channels=v.num_channels),
        text=TextConfig(width=t.hidden_size, depth=t.num_hidden_layers, mlp_dim=t.intermediate_size,
                        heads=t.num_attention_heads, vocab_size=t.vocab_size, max_len=t.max_position_embeddings,
                        pool="last"),
        embed_dim=t.projection_size)


def siglip_config(cfg: SigLIP2Config):
    """Our config -> `transformers.SiglipConfig` (fixed resolution: the table is the image's grid)."""
    from transformers import SiglipConfig

    nested = hf_config(cfg).to_dict()
    v = nested["vision_config"]
    v.pop("num_patches", None)
    v["image_size"] = int(cfg.vision.image_size)
    return SiglipConfig(text_config=nested["text_config"], vision_config=v)


def to_hf_fixed(model: SigLIP2):
    """-> a `transformers.SiglipModel` at `model.config.vision.image_size` (square inputs),
    holding copies of `model`'s weights: the Linear patch embedding as a Conv2d, the position
    table resized to the image's grid (what our model does with such an input, HF's rule)."""
    from transformers import SiglipModel

    from ..model.posemb import resize_posemb

    v = model.config.vision
    if v.image_size % v.patch_size:
        raise ValueError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    grid = v.image_size // v.patch_size
    state = dict(model.state_dict())
    key = "vision_model.embeddings."
    w = state[key + "patch_embedding.weight"]  # (D, p*p*C), patches flattened (row, column, channel)
    state[key + "patch_embedding.weight"] = w.reshape(w.shape[0], v.patch_size, v.patch_size, v.channels).permute(
        0, 3, 1, 2).contiguous()
    if grid != v.posemb_grid:
        state[key + "position_embedding.weight"] = resize_posemb(
            state[key + "position_embedding.weight"], (grid, grid), "hf").reshape(grid * grid, -1)
    p = next(model.parameters())
    hf = SiglipModel(siglip_config(model.config)).to(device=p.device, dtype=p.dtype)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"SiglipModel layout mismatch: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)


def to_hf(model: SigLIP2):
    """-> a `transformers.Siglip2Model` holding copies of `model`'s weights (same dtype/device)."""
    from transformers import Siglip2Model

    p = next(model.parameters())
    hf = Siglip2Model(hf_config(model.config)).to(device=p.device, dtype=p.dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.train(model.training)


def from_hf(hf_model_or_dir, image_size: int | None = None) -> SigLIP2:
    """A `transformers.Siglip2Model` or `SiglipModel` (fixed resolution), or a folder
    `from_pretrained` can read holding one, -> `SigLIP2`."""
    if isinstance(hf_model_or_dir, (str, Path)):
        from transformers import AutoConfig, SiglipModel, Siglip2Model

        kind = AutoConfig.from_pretrained(str(hf_model_or_dir)).model_type
        if kind not in ("siglip", "siglip2"):
            raise ValueError(f"{hf_model_or_dir}: a {kind!r} model, not SigLIP or SigLIP 2")
        hf_model_or_dir = (SiglipModel if kind == "siglip" else Siglip2Model).from_pretrained(str(hf_model_or_dir))
    hf = hf_model_or_dir
    p = next(hf.parameters())
    if hf.config.model_type == "siglip":
        return _from_siglip(hf, p)
    model = SigLIP2(our_config(hf.config, image_size)).to(device=p.device, dtype=p.dtype)
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.train(hf.training)


def _from_siglip(hf, p) -> SigLIP2:
    """A fixed-resolution `SiglipModel` -> ours: Conv2d patch embedding as the Linear, the
    position table of its image grid."""
    v = hf.config.vision_config
    nested = hf.config.to_dict()
    patch = int(v.patch_size)
    grid = int(v.image_size) // patch
    vision = dict(nested["vision_config"], num_patches=grid * grid)
    from transformers import Siglip2Config

    cfg = our_config(Siglip2Config(text_config=nested["text_config"], vision_config=vision), grid * patch)
    state = {k: t for k, t in hf.state_dict().items() if not k.endswith("position_ids")}
    key = "vision_model.embeddings.patch_embedding.weight"
    w = state[key]  # (D, C, p, p)
    state[key] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    model = SigLIP2(cfg).to(device=p.device, dtype=p.dtype)
    model.load_state_dict(state, strict=True)
    return model.train(hf.training)


PREPROCESSING = ("naflex", "fixed")


def save_hf(model: SigLIP2, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            preprocessing: str = "naflex") -> Path:
    """Write a folder transformers loads (safetensors + config + image processor):

    - `preprocessing="naflex"`: `Siglip2Model` + `Siglip2ImageProcessor` (aspect kept, at most
      posemb_grid^2 patches): the NaFlex stage's transform.
    - `preprocessing="fixed"`: `SiglipModel` + `SiglipImageProcessor` (square resize to
      image_size, bilinear): the fixed-resolution stages' transform, the layout of Google's
      fixed-resolution SigLIP 2 releases.

    Both normalise with mean = std = 0.5 (our [-1, 1] inputs). `tokenizer_dir`: a local HF
    tokenizer folder, whose tokenizer files are copied, or a single SentencePiece `.model`
    file, copied as `tokenizer.model` (loadable by sentencepiece; HF's AutoTokenizer needs a
    tokenizer.json, which is not synthesised here).
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    from transformers import Siglip2ImageProcessor, SiglipImageProcessor
    from transformers.image_utils import PILImageResampling

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model) if preprocessing == "naflex" else to_hf_fixed(model)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # save_pretrained diffs against a default (CLIP-id) config and warns about it
    try:
        hf.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.set_verbosity(level)
    v = model.config.vision
    if preprocessing == "naflex":
        Siglip2ImageProcessor(patch_size=v.patch_size, max_num_patches=v.posemb_grid**2).save_pretrained(out)
    else:
        SiglipImageProcessor(size={"height": v.image_size, "width": v.image_size}, resample=PILImageResampling.BILINEAR,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if src.is_file():
            shutil.copy(src, out / "tokenizer.model")
        elif src.is_dir():
            found = [f for f in _TOKENIZER_FILES if (src / f).is_file()]
            if not found:
                raise FileNotFoundError(f"no tokenizer files {_TOKENIZER_FILES} in {src}")
            for f in found:
                shutil.copy(src / f, out / f)
        else:
            raise FileNotFoundError(f"tokenizer {src} does not exist")
    return out
