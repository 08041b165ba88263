"""Multihead attention pooling (MAP): one learned probe attends over the tokens.

Layout and semantics are those of transformers `Siglip2MultiheadAttentionPoolingHead`
(`probe`, `attention` = `nn.MultiheadAttention`, `layernorm`, `mlp`), so released weights
load by name. Note the residual: out = a + mlp(ln(a)), with a = attention(probe, x, x).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LN_EPS, MLP


class MAPHead(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = MLP(width, mlp_dim)
        nn.init.xavier_uniform_(self.probe)  # big_vision / HF init

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, W), key_mask (B, N) bool True = real token -> pooled (B, W)."""
        probe = self.probe.expand(x.shape[0], -1, -1)
        pad = None if key_mask is None else ~key_mask.bool()
        a = self.attention(probe, x, x, key_padding_mask=pad, need_weights=False)[0]
        return (a + self.mlp(self.layernorm(a)))[:, 0]
