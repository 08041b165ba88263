"""Transformer pieces shared by the image tower, the text tower and the LocCa decoder.

Parameter names follow the released SigLIP 2 weights as laid out in
`transformers.Siglip2Model` (`self_attn.{q,k,v,out}_proj`, `layer_norm1/2`, `mlp.fc1/fc2`),
so converting a checkpoint is a rename-free `load_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # the released models use 1e-6, not torch's 1e-5 default


class MLP(nn.Module):
    """Two-layer feed-forward block with tanh-approximated GELU, as in the released weights."""

    def __init__(self, width: int, mlp_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, out_dim or width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`.

    Serves as self-attention (`context=None`) and cross-attention (`context` given).
    `key_mask` is (B, S) bool, True where a key may be attended (padding is False);
    `is_causal` adds a causal mask on top.
    """

    def __init__(self, width: int, heads: int, context_width: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        kv_width = context_width or width
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(kv_width, width)
        self.v_proj = nn.Linear(kv_width, width)
        self.out_proj = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        kv = x if context is None else context
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(kv)), self._split(self.v_proj(kv))
        attn_mask = None
        if key_mask is not None:
            attn_mask = key_mask[:, None, None, :].to(torch.bool)
            if is_causal:
                n, s = q.shape[-2], k.shape[-2]
                causal = torch.ones(n, s, dtype=torch.bool, device=x.device).tril(s - n)
                attn_mask = attn_mask & causal
                is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        b, h, n, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * dh))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.self_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = MLP(width, mlp_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask=key_mask, is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s under the name `layers`, matching `encoder.layers.N` in HF."""

    def __init__(self, width: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, heads, mlp_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_mask=key_mask, is_causal=is_causal)
        return x


def lecun_normal_(weight: torch.Tensor) -> None:
    """jax `lecun_normal`: N(0, 1/fan_in) truncated at 2 sd, by redrawing the tails
    (torch's `trunc_normal_` goes through erfinv and is ~100x slower on CPU)."""
    if weight.is_meta:
        return
    weight.normal_()
    while (bad := weight.abs() > 2).any():
        weight[bad] = torch.randn(int(bad.sum()), dtype=weight.dtype, device=weight.device)
    weight.mul_(weight.shape[1] ** -0.5 / 0.87962566103423978)  # sd of N(0,1) cut at +-2


@torch.no_grad()
def init_weights(root: nn.Module) -> None:
    """big_vision-style init of every module under `root`, each parameter drawn once.

    Attention and MLP kernels xavier-uniform (MLP biases ~N(0, 1e-6)), `nn.MultiheadAttention`
    (MAP head) xavier in-projection, embeddings N(0, 1/width), any other Linear lecun-normal
    with zero bias (patch embedding, text head). LayerNorms keep ones/zeros.
    `modules()` yields parents first, so block rules claim their Linears before the generic one.
    """
    claimed: set[int] = set()
    for m in root.modules():
        if isinstance(m, Attention):
            for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
                claimed.add(id(lin))
        elif isinstance(m, MLP):
            for lin in (m.fc1, m.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
                claimed.add(id(lin))
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.Linear) and id(m) not in claimed:
            lecun_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.embedding_dim**-0.5)
