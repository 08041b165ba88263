"""Conversion to and from `transformers.Siglip2Model` (the NaFlex layout of the released weights).

Our state_dict already has HF's names and shapes, so conversion is building the right
`Siglip2Config` and a strict `load_state_dict`. What HF cannot represent is refused rather
than silently dropped: a MAP-pooled text tower (`pool='map'`).
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


def to_hf(model: SigLIP2):
    """-> a `transformers.Siglip2Model` holding copies of `model`'s weights (same dtype/device)."""
    from transformers import Siglip2Model

    p = next(model.parameters())
    hf = Siglip2Model(hf_config(model.config)).to(device=p.device, dtype=p.dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.train(model.training)


def from_hf(hf_model_or_dir, image_size: int | None = None) -> SigLIP2:
    """A `transformers.Siglip2Model` (or a folder `from_pretrained` can read) -> `SigLIP2`."""
    if isinstance(hf_model_or_dir, (str, Path)):
        from transformers import Siglip2Model

        hf_model_or_dir = Siglip2Model.from_pretrained(str(hf_model_or_dir))
    hf = hf_model_or_dir
    p = next(hf.parameters())
    model = SigLIP2(our_config(hf.config, image_size)).to(device=p.device, dtype=p.dtype)
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.train(hf.training)


def save_hf(model: SigLIP2, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a folder that `transformers.Siglip2Model.from_pretrained` loads (safetensors), plus
    a `Siglip2ImageProcessor` config (mean/std 0.5 = our [-1, 1] inputs, max patches = grid^2).

    `tokenizer_dir`: a local HF tokenizer folder, whose tokenizer files are copied, or a single
    SentencePiece `.model` file, copied as `tokenizer.model` (loadable by sentencepiece; HF's
    AutoTokenizer needs a tokenizer.json, which is not synthesised here).
    """
    from transformers import Siglip2ImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # save_pretrained diffs against a default (CLIP-id) config and warns about it
    try:
        hf.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.set_verbosity(level)
    v = model.config.vision
    Siglip2ImageProcessor(patch_size=v.patch_size, max_num_patches=v.posemb_grid**2).save_pretrained(out)
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

