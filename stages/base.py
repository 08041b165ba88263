"""What every stage shares: the optimiser, the schedule, the named losses and their logging.

A stage is a thin LightningModule: it owns a `SigLIP2` model and a dict of named losses, each
with a weight and a start fraction that `callbacks.LossSchedule` flips during training.
`compute_losses` is the one thing each stage writes; the weighted sum, the logging of every
loss on its own and the optimiser live here so that all stages behave the same.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from siglip2.model import build_model
from siglip2.model.layers import EncoderLayer

log = logging.getLogger(__name__)


def fsdp_wrap_classes() -> set[type[nn.Module]]:
    """Transformer blocks are the FSDP units (used by conf/trainer/fsdp.yaml)."""
    classes: set[type[nn.Module]] = {EncoderLayer}
    try:
        from siglip2.model.decoder import DecoderLayer

        classes.add(DecoderLayer)
    except ImportError:  # pragma: no cover - decoder is optional for some stages
        pass
    return classes


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, token/position embeddings, the MAP probe and the logit scale/bias are not
    decayed; the patch embedding is a Linear layer and is decayed like the other weights."""
    if param.ndim <= 1:  # biases, LayerNorm weights, logit_scale/bias
        return True
    lowered = name.lower()
    return any(key in lowered for key in ("token_embedding", "position_embedding", "probe", "norm", "mask_token"))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_impl(impl: str, trainer: Any = None) -> str:
    """`optim.impl`: "fused", "foreach" or "loop", or "auto" = fused where Lightning can clip
    the gradients of a fused optimiser, else foreach.

    Fused AdamW updates each tensor in one pass; on CPU it is several times faster than
    foreach, which falls back to one kernel per tensor per operation (benchmarks/RESULTS.md).
    Lightning refuses gradient clipping for fused optimisers under mixed precision (they may
    unscale inside `step`), and DeepSpeed and FSDP own the optimiser step and the clipping, so
    those runs keep foreach.
    """
    if impl not in ("auto", "fused", "foreach", "loop"):
        raise ValueError(f"optim.impl must be auto, fused, foreach or loop, got {impl!r}")
    if impl != "auto":
        return impl
    precision = str(getattr(trainer, "precision", "32-true"))
    strategy = type(getattr(trainer, "strategy", None)).__name__.lower()
    if "mixed" in precision or "deepspeed" in strategy or "fsdp" in strategy:
        return "foreach"
    return "fused"


class Stage(L.LightningModule):
    """Base of all stages. Subclasses implement `compute_losses(batch) -> {name: (loss, metrics)}`."""

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        losses: Mapping[str, Mapping[str, Any]],
        name: str = "stage",
        handoff_fractions: list[float] | None = None,
        compile: bool | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
    ):
        """`model` is the model yaml as a dict; its `compile` key (`model.compile=true`)
        torch.compiles the towers. `compile` here is the old `stage.compile` flag, kept so that
        checkpoints saved with it still load; true is the same as `model.compile=true`."""
        super().__init__()
        model_cfg = _to_dict(model)
        model_cfg["compile"] = bool(model_cfg.get("compile", False) or compile)
        if model_cfg.get("text", {}).get("vocab_size") is None:
            if vocab_size is None:
                raise ValueError("model.text.vocab_size is null and no tokenizer vocab size was given")
            model_cfg["text"]["vocab_size"] = int(vocab_size)
        self.save_hyperparameters(
            {"model": model_cfg, "optim": _to_dict(optim), "losses": _to_dict(losses), "name": name,
             "handoff_fractions": list(handoff_fractions or []), "seed": int(seed)}
        )
        self.stage_name = name
        self.model = build_model(model_cfg)
        self.loss_specs: dict[str, dict[str, Any]] = _to_dict(losses)
        for loss_name, spec in self.loss_specs.items():
            spec.setdefault("weight", 1.0)
            spec.setdefault("start_frac", 0.0)
            if not 0.0 <= float(spec["start_frac"]) <= 1.0:
                raise ValueError(f"losses.{loss_name}.start_frac must lie in [0, 1], got {spec['start_frac']}")
        # Which losses are on; LossSchedule flips these and the checkpoint keeps them.
        self.loss_enabled: dict[str, bool] = {n: float(s["start_frac"]) <= 0.0 for n, s in self.loss_specs.items()}
        self.compile_towers = model_cfg["compile"]
        self.flops_per_batch: int | None = None

    # ---- what a stage implements -------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        raise NotImplementedError("each stage defines its losses")

    def on_loss_enabled(self, name: str) -> None:
        """Called once when a scheduled loss turns on (distillation creates its teacher here)."""

    def locca_decoder(self):
        """The LocCa decoder (referring-expression and caption eval), or None without one."""
        return None

    # ---- training ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # FLOPs per batch for Lightning's ThroughputMonitor (MFU), measured once on the meta device.
        if stage == "fit" and self.flops_per_batch is None and self.trainer is not None:
            batch = getattr(self.trainer.datamodule, "batch_size", None)
            if batch:
                try:
                    self.flops_per_batch = self.measure_flops(int(batch))
                except Exception as exc:  # MFU is a report, never a reason to stop training
                    log.warning("could not measure FLOPs per batch (%s); MFU will not be logged", exc)

    def measure_flops(self, batch_size: int) -> int:
        """Training FLOPs (forward + backward) of one batch of the towers, on meta tensors."""
        from lightning.fabric.utilities.throughput import measure_flops

        cfg = self.hparams["model"]
        with torch.device("meta"):
            model = build_model(cfg)
            image = torch.empty(batch_size, 3, cfg["vision"]["image_size"], cfg["vision"]["image_size"])
            text = torch.zeros(batch_size, cfg["text"]["max_len"], dtype=torch.long)

        def forward() -> torch.Tensor:
            return model.encode_image(image=image).pooled.sum() + model.encode_text(text).sum()

        return measure_flops(model, forward, loss_fn=lambda y: y)

    def step_generator(self) -> torch.Generator:
        """Randomness drawn inside a step (parallel prediction, views, masks) comes from a
        generator seeded by (seed, global step, rank), so a resumed run draws what an
        uninterrupted one would have."""
        seed = int(self.hparams.get("seed", 0)) * 1_000_003 + self.global_step * 7919 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def configure_model(self) -> None:
        if self.compile_towers and not getattr(self, "_compiled", False):
            self.model.vision_model.compile()
            self.model.text_model.compile()
            self._compiled = True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        results = self.compute_losses(batch)
        bsz = batch_size(batch)
        # Everything is logged as a detached device tensor: no host sync here. Lightning turns
        # progress-bar metrics into Python numbers after *every* batch (a device sync per
        # step on GPU), so losses go to the bar only when there is a bar to show them.
        bar = getattr(self._trainer, "progress_bar_callback", None) is not None
        total = None
        for name, (loss, metrics) in results.items():
            weighted = float(self.loss_specs[name]["weight"]) * loss
            total = weighted if total is None else total + weighted
            self.log(f"train/loss_{name}", loss.detach(), batch_size=bsz, prog_bar=bar and name == "sigmoid")
            for key, value in metrics.items():
                self.log(f"train/{key}", value, batch_size=bsz)
        if total is None:
            raise RuntimeError(f"no loss is enabled at step {self.global_step}: check losses.*.start_frac")
        self.log("train/loss", total.detach(), batch_size=bsz, prog_bar=bar)
        return total

    def configure_optimizers(self):
        cfg = self.hparams["optim"]
        lr = float(cfg["lr"])
        # The recipe's decay is decoupled from lr (big_vision); torch AdamW multiplies by lr.
        torch_wd = float(cfg.get("weight_decay", 0.0)) / lr if lr > 0 else 0.0
        decay, keep = [], []
        for pname, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (keep if no_decay(pname, param) else decay).append(param)
        impl = adamw_impl(cfg.get("impl", "auto"), self.trainer)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": torch_wd}, {"params": keep, "weight_decay": 0.0}],
            lr=lr,
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            eps=float(cfg.get("eps", 1e-8)),
            fused=impl == "fused" or None,
            foreach=(impl == "foreach") if impl != "fused" else None,
        )
        total = int(self.trainer.estimated_stepping_batches)
        warm = cfg.get("warmup_steps", 0)
        warmup = int(round(float(warm) * total)) if isinstance(warm, float) and warm < 1 else int(warm)
        min_ratio = float(cfg.get("min_lr_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["siglip2"] = {
            "stage": self.stage_name,
            "model": self.hparams["model"],
            "loss_enabled": dict(self.loss_enabled),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("siglip2", {})
        if meta.get("stage") not in (None, self.stage_name):
            raise ValueError(
                f"ckpt_path resumes the same stage, but this checkpoint is from stage '{meta['stage']}' "
                f"and this run is stage '{self.stage_name}'. Use init_from=... to start a new stage from it."
            )
        for name, enabled in meta.get("loss_enabled", {}).items():
            if name in self.loss_enabled and enabled and not self.loss_enabled[name]:
                self.loss_enabled[name] = True
                self.on_loss_enabled(name)
        check_shapes(self.state_dict(), checkpoint["state_dict"], source="ckpt_path")

    def load_weights(self, path: str) -> None:
        """`init_from`: weights only, shapes checked, new optimiser and schedule."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
        own = self.state_dict()
        check_shapes(own, state, source=f"init_from={path}", allow_missing=True)
        missing, unexpected = self.load_state_dict(state, strict=False)
        log.info("init_from %s: %d tensors loaded, %d not in checkpoint, %d ignored",
                 path, len(own) - len(missing), len(missing), len(unexpected))
        if len(own) == len(missing):
            raise ValueError(f"init_from={path}: no tensor of this stage's model is in the checkpoint")


def check_shapes(own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], source: str,
                 allow_missing: bool = False) -> None:
    """A checkpoint from another model size or resolution is a clear error naming the tensors."""
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in other.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [] if allow_missing else [k for k in own if k not in other]
    if bad or missing:
        lines = bad[:20] + [f"{k}: missing from checkpoint" for k in missing[:20]]
        raise ValueError(f"{source} does not fit this model ({len(bad)} shape mismatches, "
                         f"{len(missing)} missing):\n  " + "\n  ".join(lines))


def batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("image", "patches", "text"):
        if key in batch:
            return int(batch[key].shape[0])
    raise KeyError("batch has neither image, patches nor text")


def _to_dict(cfg: Any) -> Any:
    """Plain containers from OmegaConf nodes, so stages never depend on Hydra types."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {k: _to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_to_dict(v) for v in cfg]
    return cfg
