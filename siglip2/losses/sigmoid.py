"""Sigmoid loss for language-image pre-training (SigLIP, arXiv 2303.15343 §3.2-3.3).

    L = -1/|B| * sum_i sum_j log sigmoid(z_ij * (t * x_i.y_j + b)),  z_ij = +1 if i == j else -1

Two things make this more than the four-line formula:

* Memory. The per-device logits are b x b; at the recipe's per-device batch sizes autograd
  would keep every b x b intermediate (logits, labels, sigmoid) for the backward pass.
  `_ChunkedSigmoidLoss` computes the loss tile by tile (chunk_size x chunk_size) and keeps
  nothing but the inputs; its backward recomputes each tile. Peak extra memory is
  O(chunk_size^2) whatever the batch. Small batches (<= chunk_size) take the plain path.

* Distribution. With world size W > 1 every rank computes the rows of its own images
  against the text embeddings of *all* ranks: its local block holds the positives, the
  other W-1 blocks are negatives only. Text embeddings are all-gathered with a
  differentiable gather whose backward sums the gradients back to the owning rank, so
  both towers get the full gradient on every rank.

Convention (identical to open_clip's `SigLipLoss(rank, world_size)` per rank): rank r
returns L_r = (1/b) * sum_{i in rank r} sum_{j in global batch} ..., normalised by the
*local* batch size b. For the global batch of W*b, sum_r L_r = W * L_global, i.e. the mean
of the per-rank losses is exactly the single-process loss on the concatenated batch; DDP's
gradient averaging therefore yields the gradient of L_global.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from siglip2.schedule import LossTiming

from ..distributed import all_gather_with_grad, get_rank, get_world_size


def _tile_labels(r0: int, r1: int, c0: int, c1: int, pos_offset: int, device, dtype) -> torch.Tensor:
    """z for rows r0:r1 x columns c0:c1: +1 where column == row + pos_offset, else -1."""
    rows = torch.arange(r0, r1, device=device)[:, None] + pos_offset
    cols = torch.arange(c0, c1, device=device)[None, :]
    return torch.where(rows == cols, 1.0, -1.0).to(dtype)


def _pair_weights(z: torch.Tensor, neg_weight: float) -> torch.Tensor | float:
    """Each pair's weight in the loss sum: 1 for positives (z = +1), `neg_weight` for negatives."""
    return 1.0 if neg_weight == 1.0 else torch.where(z > 0, 1.0, neg_weight).to(z.dtype)


def negative_weight(batch_size: int, nominal_batch_size: int | None) -> float:
    """(N - 1) / (n - 1): the weight of each negative pair in a batch of n examples (global,
    all ranks) that makes its sigmoid loss estimate that of the nominal batch of N.

    A row of the sigmoid loss holds one positive and n - 1 negatives, so its
    no-information optimum (every logit equal) is sigmoid(logit) = 1/n, and its size and
    gradient scale grow with n. Batches of another size than the run's nominal one (NaFlex's
    halved batches at the largest length [P §2.4.2], `batching: tokens`, a last partial batch)
    then pull the shared logit bias towards another optimum than the full batches, an
    alternating push that gradient clipping turns into a smaller image-text signal (issue
    26). With every negative weighted by (N - 1)/(n - 1), each row counts as N - 1
    negatives: optimum sigmoid(logit) = 1/N and the gradient scale of a full batch, whatever
    n. Returns 1.0 when `nominal_batch_size` is None (the plain loss: SigLIP's, big_vision's
    and open_clip's), when n == N, or when n < 2 (no negatives).

    Raises ValueError for n < 1 or N < 1.
    """
    if batch_size < 1 or (nominal_batch_size is not None and nominal_batch_size < 1):
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} and nominal {nominal_batch_size}")
    if nominal_batch_size is None or batch_size == nominal_batch_size or batch_size < 2:
        return 1.0
    return (nominal_batch_size - 1) / (batch_size - 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, loss and gradients are formed in float32 when the embeddings are 16-bit."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class _ChunkedSigmoidLoss(torch.autograd.Function):
    """Sum over all (i, j) of w_ij * -log sigmoid(z_ij * (t * x_i.y_j + b)), computed tile by
    tile, with w_ij = 1 for positives and `neg_weight` for negatives.

    Row i of `x` is positive with row i + pos_offset of `y` (the rank's own block inside the
    gathered text embeddings). Returns (loss_sum, positive_logit_sum, negative_logit_sum);
    the last two are metrics and carry no gradient.

    Only x, y, t, b are saved; the backward recomputes each tile's logits, so no b x b
    tensor outlives a single loop iteration. The similarity matmul runs in the inputs' dtype
    with autocast off (forward and backward must see identical numbers); logits, loss and
    gradients are formed in float32 for 16-bit inputs. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, y, t, b, pos_offset: int, chunk_size: int, neg_weight: float = 1.0):
        n, m = x.shape[0], y.shape[0]
        acc = _acc_dtype(x.dtype)
        loss = x.new_zeros((), dtype=acc)
        pos_sum = x.new_zeros((), dtype=acc)
        all_sum = x.new_zeros((), dtype=acc)
        with _no_autocast(x.device):
            for r0 in range(0, n, chunk_size):
                r1 = min(r0 + chunk_size, n)
                xr = x[r0:r1]
                for c0 in range(0, m, chunk_size):
                    c1 = min(c0 + chunk_size, m)
                    logits = t.to(acc) * (xr @ y[c0:c1].T).to(acc) + b.to(acc)
                    z = _tile_labels(r0, r1, c0, c1, pos_offset, x.device, acc)
                    loss -= (F.logsigmoid(z * logits) * _pair_weights(z, neg_weight)).sum()
                    pos_sum += (logits * (z > 0)).sum()
                    all_sum += logits.sum()
        ctx.save_for_backward(x, y, t, b)
        ctx.pos_offset, ctx.chunk_size, ctx.neg_weight = pos_offset, chunk_size, neg_weight
        pos_sum, neg_sum = pos_sum.detach(), (all_sum - pos_sum).detach()
        ctx.mark_non_differentiable(pos_sum, neg_sum)
        return loss, pos_sum, neg_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg):
        x, y, t, b = ctx.saved_tensors
        cs, off = ctx.chunk_size, ctx.pos_offset
        n, m = x.shape[0], y.shape[0]
        acc = _acc_dtype(x.dtype)
        need_x, need_y, need_t, need_b = ctx.needs_input_grad[:4]
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        gy = torch.zeros(y.shape, dtype=acc, device=y.device) if need_y else None
        gt = torch.zeros((), dtype=acc, device=x.device)
        gb = torch.zeros((), dtype=acc, device=x.device)
        t_acc, b_acc = t.to(acc), b.to(acc)
        with _no_autocast(x.device):
            for r0 in range(0, n, cs):
                r1 = min(r0 + cs, n)
                xr = x[r0:r1]
                for c0 in range(0, m, cs):
                    c1 = min(c0 + cs, m)
                    yc = y[c0:c1]
                    sim = (xr @ yc.T).to(acc)
                    logits = t_acc * sim + b_acc
                    z = _tile_labels(r0, r1, c0, c1, off, x.device, acc)
                    # d/dl [-log sigmoid(z l)] = -z * sigmoid(-z l)
                    g = -z * torch.sigmoid(-z * logits) * _pair_weights(z, ctx.neg_weight) * grad_loss.to(acc)
                    if need_x:
                        gx[r0:r1] += t_acc * (g @ yc.to(acc))
                    if need_y:
                        gy[c0:c1] += t_acc * (g.T @ xr.to(acc))
                    if need_t:
                        gt += (g * sim).sum()
                    if need_b:
                        gb += g.sum()
        return (
            gx.to(x.dtype) if need_x else None,
            gy.to(y.dtype) if need_y else None,
            gt.reshape(t.shape).to(t.dtype) if need_t else None,
            gb.reshape(b.shape).to(b.dtype) if need_b else None,
            None,
            None,
            None,
        )


def sigmoid_loss_sums(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    pos_offset: int = 0,
    chunk_size: int = 1024,
    neg_weight: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised sum of the sigmoid loss of every image row against every text row.

    Row i of image_emb is the positive of row i + pos_offset of text_emb; all other pairs
    are negatives, each weighted by `neg_weight` (`negative_weight`; 1.0 = the plain sum).
    Returns (loss_sum, positive_logit_sum, negative_logit_sum), the last two detached. Tiles of chunk_size x chunk_size when either side exceeds chunk_size, the
    plain autograd formula otherwise (same numbers up to float rounding).
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n > chunk_size or m > chunk_size:
        return _ChunkedSigmoidLoss.apply(
            image_emb, text_emb, logit_scale, logit_bias, pos_offset, chunk_size, float(neg_weight)
        )
    acc = _acc_dtype(image_emb.dtype)
    logits = logit_scale.to(acc) * (image_emb @ text_emb.T).to(acc) + logit_bias.to(acc)
    z = _tile_labels(0, n, 0, m, pos_offset, logits.device, logits.dtype)
    loss = -(F.logsigmoid(z * logits) * _pair_weights(z, float(neg_weight))).sum()
    with torch.no_grad():
        pos_sum = (logits * (z > 0)).sum()
        neg_sum = logits.sum() - pos_sum
    return loss, pos_sum, neg_sum


@torch.no_grad()
def sigmoid_pair_losses(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Every pair's term of the sigmoid loss, without gradient: (n, m) float32 with

        l_ij = -log sigmoid(z_ij * (t * x_i.y_j + b)),  z_ij = +1 if i == j else -1,

    so `l.sum() / n` is `SigmoidLoss` on the same batch (one process). This is what data
    curation scores (ACID/JEST's learnability, `siglip2.acid`: RECIPE.md "ACID
    distillation"). The only (n, m) tensor is the result: logits are formed chunk_size x
    chunk_size at a time and written into it, as `sigmoid_loss_sums` forms them.
    `logit_scale` is the exponentiated t, as `SigmoidLoss` takes it.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = torch.empty(n, m, dtype=torch.float32, device=image_emb.device)
    t = torch.as_tensor(logit_scale, device=image_emb.device).float().reshape(())
    b = torch.as_tensor(logit_bias, device=image_emb.device).float().reshape(())
    with _no_autocast(image_emb.device):
        for r0 in range(0, n, chunk_size):
            r1 = min(r0 + chunk_size, n)
            for c0 in range(0, m, chunk_size):
                c1 = min(c0 + chunk_size, m)
                logits = t * (image_emb[r0:r1] @ text_emb[c0:c1].T).float() + b
                z = _tile_labels(r0, r1, c0, c1, 0, image_emb.device, torch.float32)
                out[r0:r1, c0:c1] = -F.logsigmoid(z * logits)
    return out


# Rows of the local b x b logits computed at a time (memory grows as chunk x b, not b^2).
DEFAULT_CHUNK = 4096


@dataclass
class SigmoidLossConfig(LossTiming):
    """`stage.losses.sigmoid`: weight and timing (on from step 0), the tile size, and
    `nominal_negatives`: weight each negative of a batch that is not the run's nominal size
    so that it estimates the nominal batch's loss (`negative_weight`). Not in the paper,
    which does not say how its halved NaFlex batches are weighted; false gives the plain
    per-batch loss. A no-op whenever every batch has the nominal size (fixed-resolution
    stages), so it matters for NaFlex (halving, `batching: tokens`) only."""

    chunk_size: int = DEFAULT_CHUNK
    nominal_negatives: bool = True


class SigmoidLoss(nn.Module):
    """SigLIP sigmoid loss, chunked and distributed-aware.

    forward(image_emb (b, D), text_emb (b, D), logit_scale (exp'd, () or (1,)), logit_bias,
    nominal_batch_size=None) -> (loss, metrics). Embeddings are expected L2-normalised. When
    torch.distributed is initialised with world size > 1 (in `group`), every rank must pass
    the same b; the loss follows open_clip's per-rank convention (see module docstring).

    `nominal_batch_size` (per rank, the run's configured batch size): when given and the
    batch has another size, every negative is weighted by `negative_weight(W*b, W*nominal)`
    so the loss has the nominal batch's no-information optimum and gradient scale (NaFlex's
    halved and token-budget batches). None: the plain loss, as open_clip's SigLipLoss.

    metrics (detached): pos_logit / neg_logit (mean positive / negative logit of this
    rank's rows), logit_scale, logit_bias.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK, group=None):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.group = group

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        nominal_batch_size: int | None = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if image_emb.shape != text_emb.shape:
            raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} differ")
        b = image_emb.shape[0]
        if not torch.is_tensor(logit_scale):
            logit_scale = torch.tensor(float(logit_scale), device=image_emb.device)
        if not torch.is_tensor(logit_bias):
            logit_bias = torch.tensor(float(logit_bias), device=image_emb.device)
        world = get_world_size(self.group)
        if world > 1:
            # Equal local batch sizes are required by the gather (and by the convention).
            all_text = all_gather_with_grad(text_emb, self.group)
            offset = get_rank(self.group) * b
        else:
            all_text, offset = text_emb, 0
        nominal = None if nominal_batch_size is None else int(nominal_batch_size) * world
        weight = negative_weight(all_text.shape[0], nominal)
        loss_sum, pos_sum, neg_sum = sigmoid_loss_sums(
            image_emb, all_text, logit_scale, logit_bias, offset, self.chunk_size, weight
        )
        loss = loss_sum / b
        num_neg = max(b * all_text.shape[0] - b, 1)
        metrics = {
            "pos_logit": pos_sum / b,
            "neg_logit": neg_sum / num_neg,
            "logit_scale": logit_scale.detach().reshape(()),
            "logit_bias": logit_bias.detach().reshape(()),
            "negative_weight": image_emb.new_tensor(weight, dtype=torch.float32),
        }
        return loss, metrics
