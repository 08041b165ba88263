"""Exporters: `hf` (transformers Siglip2Model folders, both directions)."""
from .hf import from_hf, hf_config, our_config, save_hf, to_hf

__all__ = ["to_hf", "save_hf", "from_hf", "hf_config", "our_config"]
