"""ViT image tower for fixed-resolution images and NaFlex patch sequences.

One code path serves both: a fixed-size image is patchified here into the same (N, p*p*C)
layout the NaFlex pipeline produces, so both go through the patch Linear, the per-grid
resized position table, the pre-norm encoder, `post_layernorm` and the MAP head. Parameter
names are those of transformers `Siglip2VisionTransformer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from .heads import MAPHead
from .layers import LN_EPS, Encoder, init_weights
from .posemb import grid_shapes, posemb_for_batch, resample_patch_embed, resize_posemb
from siglip2.patches import patchify


@dataclass
class VisionConfig:
    width: int
    depth: int
    mlp_dim: int
    heads: int
    patch_size: int
    posemb_grid: int  # side of the learned position table (16 in the released models)
    # default input side for fixed-resolution data. Any size is taken: the patch grid is
    # size // patch_size and the last size % patch_size rows and columns are not seen (a VALID
    # patch conv: google/siglip2-so400m-patch14-384 sees 27 x 27 patches of its 384 px input)
    image_size: int
    channels: int = 3


@dataclass
class ImageOutput:
    pooled: torch.Tensor  # (B, D) MAP-pooled embedding, not normalised
    tokens: torch.Tensor  # (B, N, W) post_layernorm'd patch tokens (LocCa, dense losses)
    token_mask: torch.Tensor | None  # (B, N) bool, True = real patch; None = no padding

    @cached_property
    def embeds(self) -> torch.Tensor:
        """(B, D) float32 L2-normalised `pooled`: the image embedding of the sigmoid loss,
        zero-shot and retrieval (HF `image_embeds`). Computed once, on first use."""
        return F.normalize(self.pooled.float(), dim=-1)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size, self.channels = cfg.patch_size, cfg.channels
        self.patch_embedding = nn.Linear(cfg.channels * cfg.patch_size**2, cfg.width)
        self.position_embedding = nn.Embedding(cfg.posemb_grid**2, cfg.width)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.head = MAPHead(cfg.width, cfg.heads, cfg.mlp_dim)
        init_weights(self)

    def forward(
        self,
        image: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        patch_coord: torch.Tensor | None = None,
        patch_valid: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        masked_patches: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> ImageOutput:
        """Either `image` (B, C, H, W), or NaFlex `patches` (B, N, p*p*C) with `patch_valid`
        (B, N) bool and the grid given by `spatial_shapes` (B, 2) (h, w) and/or `patch_coord`
        (B, N, 2) (y, x). Without `patch_coord`, patches are row-major, valid ones first.

        Masked prediction hook: where `masked_patches` (B, N) bool is True the patch
        embedding is replaced by `mask_token` (W,) *before* the position embedding is added
        (TIPS / iBOT). The token belongs to the loss that uses it, not to this tower, so
        the tower's state_dict stays that of the released weights.
        """
        if (image is None) == (patches is None):
            raise ValueError("give exactly one of `image` or `patches`")
        emb = self.embeddings
        table = emb.position_embedding.weight
        if image is not None:  # one grid for the whole batch: no host sync, compile-friendly
            patches, (h, w) = patchify(image, self.cfg.patch_size)
            pos = resize_posemb(table, (h, w))[None]
        else:
            if spatial_shapes is None:
                if patch_coord is None:
                    raise ValueError("NaFlex input needs `spatial_shapes` or `patch_coord`")
                spatial_shapes = grid_shapes(patch_coord, patch_valid)
            pos = posemb_for_batch(table, spatial_shapes, patches.shape[1], patch_coord)

        x = emb.patch_embedding(patches.to(emb.patch_embedding.weight.dtype))
        if masked_patches is not None:
            if mask_token is None:
                raise ValueError("`masked_patches` needs a `mask_token`")
            x = torch.where(masked_patches[..., None].bool(), mask_token.to(x.dtype), x)
        x = x + pos.to(x.dtype)

        key_mask = None if patch_valid is None else patch_valid.bool()
        tokens = self.post_layernorm(self.encoder(x, key_mask=key_mask))
        return ImageOutput(self.head(tokens, key_mask), tokens, key_mask)

    @torch.no_grad()
    def adapt(
        self, patch_size: int | None = None, posemb_grid: int | None = None, posemb_resize: str = "hf", **resize_kw
    ) -> None:
        """Resolution stage helper: FlexiViT PI-resize the patch Linear to `patch_size` and/or
        bilinearly resize the learned position table to `posemb_grid` x `posemb_grid`, in place.

        Not needed to run at another resolution (the table is resized per image anyway);
        use it to bake a new size into the weights, e.g. a /14 model trained on /16 patches.
        """
        emb = self.embeddings
        if patch_size is not None and patch_size != self.cfg.patch_size:
            new = resample_patch_embed(emb.patch_embedding.weight, patch_size, self.cfg.channels, **resize_kw)
            lin = nn.Linear(new.shape[1], new.shape[0], device=new.device, dtype=new.dtype)
            lin.weight.copy_(new)
            lin.bias.copy_(emb.patch_embedding.bias)
            emb.patch_embedding = lin
            self.cfg.patch_size = emb.patch_size = patch_size
        if posemb_grid is not None and posemb_grid != self.cfg.posemb_grid:
            table = resize_posemb(emb.position_embedding.weight, (posemb_grid, posemb_grid), posemb_resize)
            emb.position_embedding = nn.Embedding.from_pretrained(table.clone(), freeze=False)
            self.cfg.posemb_grid = posemb_grid
