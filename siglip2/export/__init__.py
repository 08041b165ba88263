"""Exporters: `hf` (transformers Siglip2Model folders, both directions).

The names are loaded on first use (PEP 562), so `python -m siglip2.export` can check its
arguments before torch and transformers are imported."""

from __future__ import annotations

from typing import Any

__all__ = ["to_hf", "save_hf", "from_hf", "hf_config", "our_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
