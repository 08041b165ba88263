"""SigLIP 2 towers with the released (transformers `Siglip2Model`) parameter layout."""

from .heads import MAPHead
from .posemb import posemb_for_batch, resample_patch_embed, resize_posemb
from .text import TextConfig, TextTransformer
from .two_tower import SigLIP2, SigLIP2Config, build_model
from .vit import ImageOutput, VisionConfig, VisionTransformer, patchify

__all__ = [
    "SigLIP2",
    "SigLIP2Config",
    "VisionConfig",
    "TextConfig",
    "ImageOutput",
    "build_model",
    "VisionTransformer",
    "TextTransformer",
    "MAPHead",
    "patchify",
    "resize_posemb",
    "posemb_for_batch",
    "resample_patch_embed",
]
