"""Text tower: token + learned position embedding, pre-norm encoder, final LayerNorm, pooling,
projection `head` to the shared embedding space. Names follow transformers `Siglip2TextTransformer`.

Pooling `last` (default) reads the hidden state at the last *position*, whatever token is
there (often padding): that is what the released checkpoints were trained with ([BV], [HF]),
and there is no attention mask either. `map` pools with a MAP head (`map_head`), as the
paper describes; HF cannot hold it, so such a model exports to our format only. It also uses
no padding mask, like big_vision's text encoder: padding ids are ordinary tokens to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .heads import MAPHead
from .layers import LN_EPS, Encoder, init_weights


@dataclass
class TextConfig:
    width: int
    depth: int
    mlp_dim: int
    heads: int
    vocab_size: int | None  # None in a yaml until the tokenizer is known; must be set to build
    max_len: int = 64
    pool: str = "last"  # "last" (released checkpoints) | "map"


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.width)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("text.vocab_size is None: set it from the tokenizer before building the model")
        if cfg.pool not in ("last", "map"):
            raise ValueError(f"text pool must be 'last' or 'map', got {cfg.pool!r}")
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        if cfg.pool == "map":
            self.map_head = MAPHead(cfg.width, cfg.heads, cfg.mlp_dim)
        self.head = nn.Linear(cfg.width, embed_dim)
        init_weights(self)

    def forward(self, text: torch.Tensor, return_tokens: bool = False):
        """text (B, L) token ids, L <= max_len -> (B, D) (and the (B, L, W) tokens if asked)."""
        length = text.shape[1]
        if length > self.cfg.max_len:
            raise ValueError(f"text length {length} exceeds max_len {self.cfg.max_len}")
        emb = self.embeddings
        x = emb.token_embedding(text) + emb.position_embedding.weight[:length]
        tokens = self.final_layer_norm(self.encoder(x))
        pooled = self.map_head(tokens) if self.cfg.pool == "map" else tokens[:, -1]
        out = self.head(pooled)
        return (out, tokens) if return_tokens else out
