"""LocCa token loss: softmax cross-entropy over the vocabulary, chunked so logits never exist.

SigLIP 2 [P §2.2] uses a 256k Gemma vocabulary; (batch x 64 tokens x 256k) fp32 logits would
be tens of GB, and autograd would keep them (and the softmax) for the backward. Here the
vocabulary projection, log-softmax and their gradients run over chunks of ``chunk_size``
target tokens inside one ``autograd.Function``: forward keeps only the per-token logsumexp,
backward recomputes each chunk's logits and accumulates the gradients of hidden states,
weight and bias. Peak extra memory is O(chunk_size x V) plus one weight-sized gradient.

Normalisation [P §2.2, "normalised per sequence"]: each sequence's loss is the mean over its
own target tokens; the batch loss is the mean over valid sequences (rows whose task is absent
or that have no target token are left out).

No host sync (DESIGN.md, "Scaling out"): which tokens count is a weight (0 off target), not
a boolean index, and nothing branches on the data. The projection's cost follows the tokens
it runs on, so a batch may carry host-side bounds counted on the CPU (`locca_host_bounds`):
then it runs on the target tokens only, as boolean indexing would, still without a sync;
without them it runs on every padded position (what a fixed-shape JAX loss such as big_vision's
computes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# The target conventions (IGNORE = -100 for "no loss here", the task names) are the data
# side's: one definition, in `siglip2.data.locca_targets`.
from siglip2.data.locca_targets import IGNORE, TASKS, LoccaFormat
from siglip2.model.decoder import LoccaDecoder
from siglip2.schedule import LossTiming


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T + b, t_i), and the count of argmax hits where w_i > 0, chunked
    over tokens. A token of weight 0 adds exactly 0 to the loss and its gradients (its target
    must still be a valid class index: the caller writes 0 there).

    Autocast is honoured by hand (compute dtype recorded in forward, reused in backward with
    autocast off), because the backward may run on another thread without autocast state.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, tok_w, chunk: int, cdt: torch.dtype):
        with torch.autocast(h.device.type, enabled=False):
            wc, bc = weight.to(cdt), None if bias is None else bias.to(cdt)
            lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            hits = torch.zeros((), dtype=torch.long, device=h.device)
            for s in range(0, h.shape[0], chunk):
                z, t = F.linear(h[s : s + chunk].to(cdt), wc, bc).float(), target[s : s + chunk]
                lse[s : s + chunk] = torch.logsumexp(z, -1)
                nll = lse[s : s + chunk] - z.gather(1, t[:, None])[:, 0]
                w = tok_w[s : s + chunk]
                loss += (nll * w).sum()
                hits += ((z.argmax(-1) == t) & (w > 0)).sum()  # weight 0 = not a target token
                del z
        ctx.save_for_backward(h, weight, bias, target, tok_w, lse)
        ctx.chunk, ctx.cdt = chunk, cdt
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, g_loss, _g_hits):
        h, weight, bias, target, tok_w, lse = ctx.saved_tensors
        chunk, cdt = ctx.chunk, ctx.cdt
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b and bias is not None else None
        with torch.autocast(h.device.type, enabled=False):
            wc, bc = weight.to(cdt), None if bias is None else bias.to(cdt)
            scale = tok_w * g_loss.float()
            for s in range(0, h.shape[0], chunk):
                hc = h[s : s + chunk].to(cdt)
                p = F.linear(hc, wc, bc).float().sub_(lse[s : s + chunk, None]).exp_()  # softmax
                p[torch.arange(p.shape[0], device=p.device), target[s : s + chunk]] -= 1
                p.mul_(scale[s : s + chunk, None])  # d loss / d logits
                if gb is not None:
                    gb += p.sum(0)
                pc = p.to(cdt)
                if gh is not None:
                    gh[s : s + chunk] = (pc @ wc).to(h.dtype)
                if gw is not None and cdt == torch.float32:
                    gw.addmm_(pc.t(), hc)  # in place: no weight-sized temporary
                elif gw is not None:
                    gw.add_(pc.t() @ hc)
                del p, pc
        return (
            gh,
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(hidden, weight, bias, target, token_weight, chunk_size: int = 1024):
    """Weighted token CE of ``hidden (N, W)`` through ``Linear(weight, bias)`` -> (sum, hits)."""
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return _ChunkedLinearCE.apply(hidden, weight, bias, target, token_weight.float(), int(chunk_size), cdt)


class LoccaLoss(nn.Module):
    """Per-sequence-normalised token cross-entropy of decoder hidden states."""

    def __init__(self, chunk_size: int = 1024):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        head: nn.Linear,
        targets: torch.Tensor,
        valid: torch.Tensor | None = None,
        max_targets: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """hidden (B, L, W); targets (B, L) with -100 = no loss; valid (B,) bool (task present).

        ``max_targets``: a host-side upper bound of the target tokens (a Python int counted
        on the CPU batch, `locca_host_bounds`). With it the vocabulary projection runs on
        the first ``max_targets`` positions in target-first order (a fixed-shape gather whose
        size the host already knows); without it, on all B*L positions, weight 0 where there
        is no target. Either way the result is the same and nothing waits for the device.

        Returns (loss, metrics) with metrics ``loss``, ``acc`` (token argmax accuracy),
        ``tokens`` and ``sequences`` (counts), all detached.
        """
        # No host sync and no branch on the data: weights, 0 where there is no target, instead
        # of boolean indexing. A batch without any target token gives an exact 0 that still
        # reaches the decoder (same graph on every rank and every step).
        tgt_mask = targets != IGNORE
        if valid is not None:
            tgt_mask = tgt_mask & valid.to(torch.bool)[:, None]
        per_seq = tgt_mask.sum(1)
        n_seq = (per_seq > 0).sum()
        n_tok = tgt_mask.sum()
        w = (1.0 / per_seq.clamp_min(1).float())[:, None].expand_as(tgt_mask) / n_seq.clamp_min(1).float()
        w = torch.where(tgt_mask, w, torch.zeros_like(w)).reshape(-1)
        flat_targets = torch.where(tgt_mask, targets, torch.zeros_like(targets)).reshape(-1)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        if max_targets is not None and max_targets < flat_targets.shape[0]:
            # target positions first, each group in row-major order (stable): the first
            # max_targets rows hold every target token, in the order boolean indexing gives
            torch._assert_async(n_tok <= max_targets, "LocCa: more target tokens than max_targets")
            order = (~tgt_mask).reshape(-1).to(torch.uint8).argsort(stable=True)[: max(int(max_targets), 1)]
            flat_hidden, flat_targets, w = flat_hidden.index_select(0, order), flat_targets[order], w[order]
        loss, hits = chunked_linear_cross_entropy(flat_hidden, head.weight, head.bias, flat_targets, w, self.chunk_size)
        return loss, {
            "loss": loss.detach(),
            "acc": hits.float() / n_tok.clamp_min(1),
            "tokens": n_tok,
            "sequences": n_seq,
        }


def locca_host_bounds(batch: Mapping[str, torch.Tensor], tasks=TASKS) -> dict[str, int]:
    """Python ints that let the LocCa objective trim its work without asking the device:
    ``locca_{t}_max_targets`` (the task's target tokens in rows with ``locca_{t}_valid``) and
    ``locca_{t}_columns`` (1 + the last column holding one of them; 0 when none).

    Count them where the batch is still on the CPU (the data module, before the transfer):
    ints travel with the batch untouched, and bounds counted on a batch stay valid for any
    slice of its rows. `LoccaObjective` reads them when present; without them it does the
    same maths on the full padded length.
    """
    out = {}
    for t in tasks:
        key = f"locca_{t}_target"
        if key not in batch:
            continue
        has = (batch[key] != IGNORE) & batch[f"locca_{t}_valid"].to(torch.bool).reshape(-1, 1)
        cols = has.any(0).nonzero()
        out[f"locca_{t}_max_targets"] = int(has.sum())
        out[f"locca_{t}_columns"] = int(cols.max()) + 1 if cols.numel() else 0
    return out


class LoccaObjective(nn.Module):
    """The three LocCa tasks (Cap, ARef, GCap) on one decoder, from the ``locca_*`` batch keys.

    total = sum_t weight_t * loss_t / (number of tasks present in the batch), so with the
    default unit weights it is the plain mean over tasks present; a task is present when any
    row has ``locca_{t}_valid``. Every task of nonzero weight runs its decoder pass on every
    step, present or not: an absent task's loss is an exact 0 through the same graph, so all
    ranks issue the same passes (FSDP's all-gathers) and nothing waits for the device to
    decide what to run (no host sync). Parallel prediction is drawn per row with
    ``parallel_prob`` (0.5 [P §2.2]) in training mode, for Cap only: ARef and GCap are
    conditioned on their prompt, which the all-mask input of parallel prediction would erase.
    Optional Python ints in the batch (`locca_host_bounds`, counted on the CPU) trim the work
    exactly: ``locca_{t}_max_targets`` bounds the tokens the vocabulary projection runs on (see
    `LoccaLoss`), and ``locca_{t}_columns`` cuts the columns after the last target token for
    tasks without parallel rows (causal rows never read the positions after it; parallel rows
    attend to every position, so Cap keeps its full length in training).

    Metrics: ``locca/<task>`` (loss), ``locca/<task>_acc`` (token accuracy), ``locca/loss``,
    for every task of nonzero weight (0 on a step where the task is absent).
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        parallel_prob: float = 0.5,
        chunk_size: int = 1024,
        tasks=TASKS,
    ):
        super().__init__()
        self.tasks = tuple(tasks)
        weights = dict(weights or {})
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        self.parallel_prob = parallel_prob
        self.token_loss = LoccaLoss(chunk_size)

    def forward(
        self,
        decoder,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ):
        total, present, metrics = image_tokens.new_zeros(()), image_tokens.new_zeros((), dtype=torch.float32), {}
        active = [t for t in self.tasks if self.weights[t] != 0]  # configuration, not data
        for t in active:
            valid = batch[f"locca_{t}_valid"].to(torch.bool).view(-1)
            tokens_in, targets = batch[f"locca_{t}_input"], batch[f"locca_{t}_target"]
            parallel = None
            if t == "cap" and self.training and self.parallel_prob > 0:
                r = torch.rand(tokens_in.shape[0], generator=generator, device=generator.device if generator else "cpu")
                parallel = (r < self.parallel_prob).to(tokens_in.device, non_blocking=True)
            columns, bound = batch.get(f"locca_{t}_columns"), batch.get(f"locca_{t}_max_targets")
            if parallel is None and isinstance(columns, int) and 0 < columns < tokens_in.shape[1]:
                tokens_in, targets = tokens_in[:, :columns], targets[:, :columns]
            hidden = decoder(tokens_in, image_tokens, image_mask, parallel=parallel)
            loss, m = self.token_loss(
                hidden, decoder.head, targets, valid, max_targets=bound if isinstance(bound, int) else None
            )
            total = total + self.weights[t] * loss  # an absent task's loss is an exact 0
            present = present + valid.any().float()
            metrics[f"locca/{t}"], metrics[f"locca/{t}_acc"] = m["loss"], m["acc"]
        if not active:  # nothing to learn from: an exact zero that still reaches the decoder
            total = 0.0 * sum(p.sum() for p in decoder.parameters())
        total = total / present.clamp_min(1.0)
        metrics["locca/loss"] = total.detach()
        return total, metrics


@dataclass
class LoccaConfig(LossTiming):
    """`stage.losses.locca` [P §2.2]: on from step 0 with the sigmoid loss's weight.

    depth_ratio: decoder depth / text depth (0.5 in the paper). parallel_prob: share of Cap
    rows predicted in parallel (big_vision CapPa; not published for SigLIP 2). chunk_size:
    target tokens per chunk of the vocabulary projection. task_weights: per task (not
    published: equal). targets: how prompts and boxes are written (`LoccaFormat`).
    """

    depth_ratio: float = 0.5
    parallel_prob: float = 0.5
    chunk_size: int = 1024
    task_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    targets: LoccaFormat = field(default_factory=LoccaFormat)

    def __post_init__(self):
        super().__post_init__()
        unknown = set(self.task_weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown LocCa task(s) {sorted(unknown)} in task_weights; tasks are {list(TASKS)}")


class LoccaHead(nn.Module):
    """The LocCa decoder and its three-task objective: one module a stage holds as a loss.

    The decoder has the text tower's width, heads and MLP size, `depth_ratio` of its depth
    (at least 1), `targets.max_len` positions, and cross-attends to image tokens of width
    `image_width`. forward(batch, image_tokens (B, N, image_width), image_mask (B, N) | None,
    generator) -> (loss, metrics), as `LoccaObjective`.
    """

    def __init__(
        self, cfg: LoccaConfig, *, width: int, depth: int, heads: int, mlp_dim: int, vocab_size: int, image_width: int
    ):
        super().__init__()
        self.decoder = LoccaDecoder(
            width=width,
            depth=max(1, round(depth * float(cfg.depth_ratio))),
            heads=heads,
            mlp_dim=mlp_dim,
            vocab_size=vocab_size,
            max_len=int(cfg.targets.max_len),
            image_width=image_width,
        )
        self.objective = LoccaObjective(
            weights=cfg.task_weights, parallel_prob=float(cfg.parallel_prob), chunk_size=int(cfg.chunk_size)
        )

    @classmethod
    def for_model(cls, cfg: LoccaConfig, model_config) -> "LoccaHead":
        """Sized from a `SigLIP2Config`: the text tower's shape, the image tower's width."""
        text, vision = model_config.text, model_config.vision
        return cls(
            cfg,
            width=text.width,
            depth=text.depth,
            heads=text.heads,
            mlp_dim=text.mlp_dim,
            vocab_size=text.vocab_size,
            image_width=vision.width,
        )

    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ):
        return self.objective(self.decoder, image_tokens, image_mask, batch, generator=generator)
