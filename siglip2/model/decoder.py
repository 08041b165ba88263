"""LocCa decoder: a small transformer decoder that reads the un-pooled image tokens.

SigLIP 2 [P §2.2] attaches it to the image tower during pretraining (captioning, referring
expressions, grounded captioning). Shape: the text tower's width, heads and MLP, half its
depth (the caller passes ``depth``). Each block is pre-norm causal self-attention, then
cross-attention to the image tokens, then the MLP (LayerNorm eps 1e-6).

Parallel prediction (CapPa, [BV] ``models/proj/cappa/cappa.py``): for rows flagged
``parallel`` every input token is replaced by the mask token (id ``vocab_size``; the embedding
has ``vocab_size + 1`` rows) and self-attention is bidirectional, so the row must predict all
of its tokens from the image alone.

Initialisation follows [BV] CapPa's decoder: attention kernels lecun-normal (flax's default;
the reference has no attention biases, ours start at 0), MLP kernels xavier-uniform with biases
~N(0, 1e-6), target-token embeddings N(0, 1), learned positions N(0, 1/width), and a zero
vocabulary projection (`init_decoder_weights`).

``forward`` returns hidden states, not logits: the loss applies ``head`` in chunks
(``siglip2.losses.locca``) so that (tokens x vocab) logits never exist at once for a 256k vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from siglip2.model.layers import LN_EPS, MLP, Attention, lecun_normal_


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def self_attention_mask(length: int, parallel: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend: causal for ordinary rows, all-True for parallel rows."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = causal.expand(batch, 1, length, length)
    if parallel is None:
        return mask
    return mask | parallel.to(device=device, dtype=torch.bool).view(batch, 1, 1, 1)


class DecoderLayer(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the image, MLP.

    Reuses ``layers.Attention`` for its parameters (``q/k/v/out_proj``) but runs attention
    itself, because decoding needs a per-row (B, 1, L, L) mask and a key/value cache that
    ``Attention.forward`` does not take.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, image_width: int):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.self_attn = Attention(width, heads)
        self.cross_attn_layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.cross_attn = Attention(width, heads, context_width=image_width)
        self.layer_norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = MLP(width, mlp_dim)

    def cross_kv(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values, computed once per image (cached during decoding)."""
        a = self.cross_attn
        return _heads(a.k_proj(image_tokens), self.heads), _heads(a.v_proj(image_tokens), self.heads)

    def forward(
        self,
        x,
        cross_kv=None,
        cross_mask=None,
        self_mask=None,
        cache=None,
        pos: int = 0,
        is_causal=False,
        image_tokens: torch.Tensor | None = None,
    ):
        """``cross_kv``: this layer's image keys/values from ``cross_kv()``, or None with
        ``image_tokens`` (B, N, Wi), from which they are computed here, inside the block's own
        forward (under FSDP the block's weights are whole only there).
        ``self_mask`` (B|1, 1, n, S) bool, or ``is_causal`` (no mask tensor: lets SDPA use
        its fused kernels). ``cache``: (k, v) buffers (B, H, T, dh) filled at [pos, pos + n) in
        place; attention then reads keys [0, pos + n). Without a cache keys are this call's tokens."""
        if cross_kv is None:
            if image_tokens is None:
                raise ValueError("DecoderLayer needs cross_kv or image_tokens")
            cross_kv = self.cross_kv(image_tokens)
        a, h = self.self_attn, self.layer_norm1(x)
        q, k, v = _heads(a.q_proj(h), self.heads), _heads(a.k_proj(h), self.heads), _heads(a.v_proj(h), self.heads)
        if cache is not None:
            n = x.shape[1]
            cache[0][:, :, pos : pos + n], cache[1][:, :, pos : pos + n] = k, v
            k, v = cache[0][:, :, : pos + n], cache[1][:, :, : pos + n]
        x = x + a.out_proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask, is_causal=is_causal)))
        c = self.cross_attn
        q = _heads(c.q_proj(self.cross_attn_layer_norm(x)), self.heads)
        x = x + c.out_proj(_merge(F.scaled_dot_product_attention(q, *cross_kv, attn_mask=cross_mask)))
        return x + self.mlp(self.layer_norm2(x))


@torch.no_grad()
def init_decoder_weights(decoder: "LoccaDecoder") -> None:
    """[BV] `models/proj/cappa/cappa.py`'s initialisation, in place: self- and cross-attention
    q/k/v/out kernels lecun-normal (N(0, 1/fan_in) cut at 2 sd: flax attention's default) with
    zero biases; MLP kernels xavier-uniform, biases N(0, 1e-6); the target-token embedding
    N(0, 1) (mask row included); learned positions N(0, 1/width); LayerNorms ones/zeros; the
    vocabulary projection zero, so the first loss is exactly log(V)."""
    for layer in decoder.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                lecun_normal_(lin.weight)
                nn.init.zeros_(lin.bias)
        for lin in (layer.mlp.fc1, layer.mlp.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)
        for norm in (layer.layer_norm1, layer.cross_attn_layer_norm, layer.layer_norm2):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
    nn.init.normal_(decoder.token_embedding.weight, std=1.0)
    nn.init.normal_(decoder.position_embedding, std=decoder.position_embedding.shape[1] ** -0.5)
    nn.init.zeros_(decoder.head.weight)
    nn.init.zeros_(decoder.head.bias)


class LoccaDecoder(nn.Module):
    """Token embedding (+1 mask row) + learned positions, ``depth`` DecoderLayers, final
    LayerNorm, and ``head`` (width -> vocab_size), which the caller or loss applies."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        vocab_size: int,
        max_len: int,
        image_width: int | None = None,
    ):
        super().__init__()
        self._init_args = dict(
            width=width,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            vocab_size=vocab_size,
            max_len=max_len,
            image_width=image_width,
        )
        self.vocab_size, self.max_len, self.heads = vocab_size, max_len, heads
        self.mask_id = vocab_size  # CapPa convention: the extra embedding row
        self.token_embedding = nn.Embedding(vocab_size + 1, width)
        self.position_embedding = nn.Parameter(torch.empty(max_len, width))
        self.layers = nn.ModuleList(DecoderLayer(width, heads, mlp_dim, image_width or width) for _ in range(depth))
        self.final_layer_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, vocab_size)
        init_decoder_weights(self)

    def rebuild(self) -> "LoccaDecoder":
        """A new decoder of the same shape (fresh initialisation), e.g. an unwrapped copy of an
        FSDP-wrapped one to load full weights into."""
        return LoccaDecoder(**self._init_args)

    def _embed(self, tokens: torch.Tensor, pos: int = 0) -> torch.Tensor:
        n = tokens.shape[1]
        if pos + n > self.max_len:
            raise ValueError(f"decoder positions {pos + n} exceed max_len {self.max_len}")
        return self.token_embedding(tokens) + self.position_embedding[pos : pos + n]

    @staticmethod
    def _cross_mask(image_mask):
        return None if image_mask is None else image_mask.to(torch.bool)[:, None, None, :]

    def forward(
        self,
        tokens_in: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        parallel: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens_in (B, L) -> hidden (B, L, W) after the final LayerNorm.

        image_tokens (B, N, Wi) un-pooled; image_mask (B, N) bool, True = real token (NaFlex
        padding False); parallel (B,) bool rows get all-mask inputs and no causal mask.
        """
        b, n = tokens_in.shape
        if parallel is not None:
            par = parallel.view(b, 1).to(device=tokens_in.device, dtype=torch.bool)
            tokens_in = torch.where(par, torch.full_like(tokens_in, self.mask_id), tokens_in)
        x = self._embed(tokens_in)
        self_mask = None if parallel is None else self_attention_mask(n, parallel, b, x.device)
        cross_mask = self._cross_mask(image_mask)
        for layer in self.layers:
            x = layer(x, None, cross_mask, self_mask, is_causal=parallel is None, image_tokens=image_tokens)
        return self.final_layer_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    @torch.no_grad()
    def generate(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None,
        prefix_ids: torch.Tensor,
        max_new_tokens: int,
        eos_id: int,
        prefix_len: torch.Tensor | None = None,
        pad_id: int | None = None,
    ) -> torch.LongTensor:
        """Greedy decoding with a self-attention KV cache and cross-attention K/V computed once.

        prefix_ids (B, P): the task prompt (e.g. the encoded ``"caption:"``), right-padded when
        rows differ in length, with ``prefix_len`` (B,) giving each row's length. Rows share
        positions (learned absolute positions forbid left padding), so after the common part
        of the prompts, shorter rows already generate while longer rows are still being fed
        their prompt (teacher forcing on the prompt). Returns (B, max_new_tokens) tokens after
        each row's prompt; after a row's EOS the rest is ``pad_id`` (default: ``eos_id``).
        """
        b, p = prefix_ids.shape
        dev = prefix_ids.device
        if max_new_tokens <= 0:
            return torch.empty(b, 0, dtype=torch.long, device=dev)
        plen = torch.full((b,), p, device=dev, dtype=torch.long) if prefix_len is None else prefix_len.to(dev).long()
        if plen.min() < 1:
            raise ValueError("every row needs at least one prompt token (the start token)")
        total = int(plen.max()) + max_new_tokens - 1  # positions fed to the decoder
        if total > self.max_len:
            raise ValueError(f"prompt + new tokens need {total} positions, max_len is {self.max_len}")
        fill = eos_id if pad_id is None else pad_id
        buf = torch.full((b, total + 1), fill, dtype=torch.long, device=dev)
        buf[:, :p] = prefix_ids
        is_prompt = torch.arange(total + 1, device=dev)[None] < plen[:, None]
        cross_mask = self._cross_mask(image_mask)
        cross = [layer.cross_kv(image_tokens) for layer in self.layers]
        dh = self.position_embedding.shape[1] // self.heads
        dtype = cross[0][0].dtype if cross else self.position_embedding.dtype  # autocast-aware
        caches = [
            (
                torch.empty(b, self.heads, total, dh, device=dev, dtype=dtype),
                torch.empty(b, self.heads, total, dh, device=dev, dtype=dtype),
            )
            for _ in self.layers
        ]
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        pos, n = 0, int(plen.min())  # first call: the prompt part every row has, causal
        while pos < total:
            x = self._embed(buf[:, pos : pos + n], pos)
            mask = torch.ones(n, pos + n, dtype=torch.bool, device=dev).tril(pos) if n > 1 else None
            for layer, kv, cache in zip(self.layers, cross, caches):
                x = layer(x, kv, cross_mask, mask, cache=cache, pos=pos)
            nxt = self.head(self.final_layer_norm(x[:, -1])).argmax(-1)
            pos += n
            forced = is_prompt[:, pos]
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            buf[:, pos] = torch.where(forced, buf[:, pos], nxt)
            done = done | (~forced & (nxt == eos_id))
            if bool(done.all()):
                break
            n = 1
        idx = plen[:, None] + torch.arange(max_new_tokens, device=dev)[None]
        return buf.gather(1, idx)
