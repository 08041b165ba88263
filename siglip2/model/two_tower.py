"""SigLIP 2 two-tower model: ViT image tower + transformer text tower + learned logit scale/bias.

The state_dict is that of `transformers.Siglip2Model` (its non-persistent buffers aside), so
released weights load with a plain `load_state_dict` and `siglip2.export.hf` is a thin layer.
Logits are t * <x, y> + b with t = exp(logit_scale), init t = 10, b = -10 (SigLIP §4.8) unless
the config says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .text import TextConfig, TextTransformer
from .vit import ImageOutput, VisionConfig, VisionTransformer


# Keys a model yaml may hold that configure how the model is run or trained, not what it is
# (`distill`: the size-dependent self-distillation settings the stage reads).
RUNTIME_KEYS = frozenset({"compile", "distill", "naflex_seq_lens", "naflex_eval_seq_len"})


@dataclass
class SigLIP2Config:
    vision: VisionConfig
    text: TextConfig
    embed_dim: int | None = None  # must equal vision.width (HF has no image projection)
    # Initial temperature t and bias b of the logits t * <x, y> + b. SigLIP's t = 10, b = -10
    # were tuned for batches of ~32k; b near -log(batch) balances one positive against
    # batch - 1 negatives at init. Not published for small batches, so configurable; on the demo
    # (batch 128, lr 5e-4) b = -5 and b = -10 learned equally fast (docs/results.md). Init-only: not
    # part of the released weights' config.
    logit_scale_init: float = 10.0
    logit_bias_init: float = -10.0
    name: str = field(default="siglip2", compare=False)

    def __post_init__(self):
        if isinstance(self.vision, Mapping):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, Mapping):
            self.text = TextConfig(**self.text)
        if self.embed_dim is None:
            self.embed_dim = self.vision.width
        if self.embed_dim != self.vision.width:
            raise ValueError(
                f"embed_dim {self.embed_dim} != vision width {self.vision.width}: the image embedding is the "
                "MAP head output, with no projection (released layout); only the text tower is projected"
            )

    @classmethod
    def from_dict(cls, d: Mapping) -> "SigLIP2Config":
        """From the nested dict of `conf/model/*.yaml` (after `OmegaConf.to_container`).
        Run-time options of the yaml (`RUNTIME_KEYS`, e.g. `compile`, read by the stage) are
        not architecture and are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - RUNTIME_KEYS
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SigLIP2(nn.Module):
    def __init__(self, config: SigLIP2Config | Mapping):
        super().__init__()
        if isinstance(config, Mapping):
            config = SigLIP2Config.from_dict(config)
        self.config = config
        self.vision_model = VisionTransformer(config.vision)
        self.text_model = TextTransformer(config.text, config.embed_dim)
        if config.logit_scale_init <= 0:
            raise ValueError(f"logit_scale_init is the temperature t > 0 (not its log), got {config.logit_scale_init}")
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(config.logit_bias_init)))

    def encode_image(
        self,
        image: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        patch_coord: torch.Tensor | None = None,
        patch_valid: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **hooks,
    ) -> ImageOutput:
        """See `VisionTransformer.forward`; `hooks` = `masked_patches`, `mask_token`."""
        return self.vision_model(image, patches, patch_coord, patch_valid, spatial_shapes, **hooks)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, D), not normalised (HF `get_text_features`)."""
        return self.text_model(text)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, D) float32 L2-normalised text embeddings (HF `text_embeds`); the
        text side of `ImageOutput.embeds`."""
        return F.normalize(self.encode_text(text).float(), dim=-1)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None, **image_kw) -> dict:
        """-> dict(image_emb, text_emb (L2-normalised), logit_scale (exp'd), logit_bias).

        Also returns `image_tokens` / `image_token_mask` (for LocCa and dense losses, saving a
        second image pass). NaFlex inputs go through `image_kw` (patches, patch_valid, ...);
        either tower may be skipped by passing None.
        """
        out = {"logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}
        if image is not None or image_kw.get("patches") is not None:
            img = self.encode_image(image, **image_kw)
            out.update(image_emb=img.embeds, image_tokens=img.tokens, image_token_mask=img.token_mask)
        if text is not None:
            out["text_emb"] = self.embed_text(text)
        return out


def build_model(cfg: SigLIP2Config | Mapping) -> SigLIP2:
    """Build from a `SigLIP2Config` or the plain nested dict of a model yaml."""
    return SigLIP2(cfg)
