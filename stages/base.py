"""What every stage shares: the optimiser, the recipe's clock, the named losses and their logging.

A stage is a thin LightningModule: a `SigLIP2` model and an `nn.ModuleDict` of named losses,
all built in `__init__` (losses that join later included), so that DDP, FSDP, the optimiser
and the checkpoint see the same parameters from step 0. Each step, `compute_losses` runs every
loss that is on with the inputs the stage's `loss_inputs` takes from a `StepContext`, which
computes each shared forward pass once and only if a loss asks for it. When a loss is off,
its parameters still join the graph with weight 0 (DDP's reducer expects every parameter's
gradient). `callbacks.LossSchedule` asks `siglip2.schedule.RecipeClock` which losses are on;
at a switch the joining loss's parameters are re-initialised and their optimiser state
cleared.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.strategies import ParallelStrategy
import torch
from torch import nn

from siglip2.checkpoint import CHECKPOINT_FORMAT, CheckpointMeta, upgrade_state_dict
from siglip2.config import from_dict, to_dict
from siglip2.data.tokenizer import TokenizerRecord
from siglip2.data.transforms import normalize_pixels
from siglip2.model import build_model
from siglip2.model.posemb import POSEMB_RESIZE
from siglip2.model.two_tower import SigLIP2Config
from siglip2.optim import OptimConfig, adamw_impl, param_groups
from siglip2.schedule import ClockWindow, LossTiming, RecipeClock
from siglip2.weights import check_shapes, init_from
from stages import sharding
from stages.context import StepContext

__all__ = ["Stage", "StepContext", "batch_size", "plain_config"]

log = logging.getLogger(__name__)

# Metric prefixes logged as they are (their own W&B section), not under `train/`.
OWN_SECTION = ("distill/",)


class Stage(L.LightningModule):
    """Base of all stages.

    Subclasses set `LOSSES` (loss name -> its config dataclass, a `LossTiming`) and implement
    `build_loss(name, cfg) -> nn.Module` and `loss_inputs(name, ctx) -> kwargs of that
    loss's forward`. Each loss returns `(scalar, {metric: tensor})`.
    """

    NAME = "stage"  # what checkpoints record; `ckpt_path` resumes only the same stage
    LOSSES: dict[str, type[LossTiming]] = {}

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        losses: Mapping[str, Mapping[str, Any]],
        name: str | None = None,
        handoff_fractions: list[float] | None = None,
        clock: Mapping[str, Any] | None = None,
        compile: bool | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
        posemb_resize: str = "hf",
        optim_overrides: Mapping[str, Any] | None = None,
        recipe: Any = None,
    ):
        """`model`: the model yaml as a dict; its `compile` key (`model.compile=true`)
        torch.compiles the towers (`compile` here is the old `stage.compile` flag, kept so that
        checkpoints saved with it still load). `optim`: `OptimConfig` keys. `losses`: loss name
        -> its config keys (`LOSSES`). `clock`: `siglip2.schedule.ClockWindow` keys (`stage.clock`;
        `recipe`, its old name, is refused naming the new one). `posemb_resize`: how `init_from`
        resizes a checkpoint's position table to this model's grid ("hf" or "bv_zoom",
        `siglip2.model.posemb.resize_posemb`). `optim_overrides`: the stage's own
        optimiser keys over `optim` (ACID: lr 1e-5, no weight decay). Unknown names or keys raise
        `ValueError` naming them, before anything is built."""
        super().__init__()
        if recipe is not None:
            raise ValueError(
                "stage.recipe moved to stage.clock (the stage's window of the recipe's clock): rename the block"
            )
        name = name or self.NAME
        model_cfg = plain_config(model)
        model_cfg["compile"] = bool(model_cfg.get("compile", False) or compile)
        if model_cfg.get("text", {}).get("vocab_size") is None:
            if vocab_size is None:
                raise ValueError("model.text.vocab_size is null and no tokenizer vocab size was given")
            model_cfg["text"]["vocab_size"] = int(vocab_size)
        overrides = plain_config(optim_overrides or {})
        if overrides:
            log.info("stage %s sets its own optimiser keys over optim: %s", name, overrides)
        optim = {**plain_config(optim), **overrides}
        self.optim_config = from_dict(OptimConfig, optim, "optim")
        self.clock_window = from_dict(ClockWindow, plain_config(clock or {}), "stage.clock")
        if posemb_resize not in POSEMB_RESIZE:
            raise ValueError(f"stage.posemb_resize must be one of {POSEMB_RESIZE}, got {posemb_resize!r}")
        self.posemb_resize = posemb_resize
        # a loss set to null (`losses: {masked: null}`, `stage.losses.masked=null`) is not built
        self.loss_configs = self.parse_losses({k: v for k, v in plain_config(losses).items() if v is not None})
        SigLIP2Config.from_dict(model_cfg)  # unknown model keys fail here, before any compute
        self.save_hyperparameters(
            {
                "model": model_cfg,
                "optim": plain_config(optim),
                "losses": plain_config(losses),
                "name": name,
                "handoff_fractions": list(handoff_fractions or []),
                "clock": plain_config(clock or {}),
                "seed": int(seed),
                "posemb_resize": posemb_resize,
            }
        )
        self.stage_name = name
        self.model = build_model(model_cfg)
        self.losses = nn.ModuleDict({n: self.build_loss(n, c) for n, c in self.loss_configs.items()})
        # Each parameter's ndim as built, before any strategy flattens it into shards: which
        # parameters decay is decided by it (FSDP1 hands the optimiser 1-D views).
        self._param_ndims = {n: p.ndim for n, p in self.named_parameters()}
        self._gates_open: dict[str, bool] = {}
        # Which losses are on; LossSchedule flips these and the checkpoint keeps them.
        self.loss_enabled: dict[str, bool] = {
            n: RecipeClock.loss_on(c, self.clock_window.window[0]) for n, c in self.loss_configs.items()
        }
        self.compile_towers = model_cfg["compile"]
        self.flops_per_batch: int | None = None
        self.examples_seen = 0  # this stage's training examples, all ranks (the recipe's clock)
        # the `init_from` source's `CheckpointMeta` (its recipe's length) and what was loaded
        self.init_source: CheckpointMeta | None = None
        self.init_record: dict[str, Any] | None = None
        # the run's tokenizer (set by stages.runner.build): recorded in every checkpoint so that
        # eval, export and later stages use the same ids
        self.tokenizer_record: TokenizerRecord | None = None
        self._clock: RecipeClock | None = None
        self._first_batch = 0  # per-rank batch size of the first batch, if the data module gives none

    @classmethod
    def parse_losses(cls, losses: Mapping[str, Any]) -> dict[str, LossTiming]:
        unknown = [n for n in losses if n not in cls.LOSSES]
        if unknown:
            raise ValueError(f"unknown loss {unknown} in stage.losses; {cls.__name__} has {sorted(cls.LOSSES)}")
        return {n: from_dict(cls.LOSSES[n], spec, f"stage.losses.{n}") for n, spec in losses.items()}

    # ---- what a stage implements -------------------------------------------------------
    def build_loss(self, name: str, cfg: LossTiming) -> nn.Module:
        raise NotImplementedError("each stage builds its losses")

    def context(self, batch: Mapping[str, Any]) -> StepContext:
        """The step's shared forward passes (a stage with more passes returns a subclass)."""
        return StepContext(self, batch)

    def loss_inputs(self, name: str, ctx: StepContext) -> dict[str, Any]:
        raise NotImplementedError("each stage says what its losses take")

    def on_loss_enabled(self, name: str) -> None:
        """Called once when a scheduled loss turns on, after its parameters were re-initialised
        (distillation copies the student into its teacher here)."""

    def lr_multipliers(self) -> dict[str, float]:
        """Parameter-name prefix -> lr multiplier (e.g. distillation heads' `head_lr_mult`)."""
        return {}

    def locca_decoder(self):
        """The LocCa decoder (referring-expression and caption eval), or None without one."""
        head = self.losses["locca"] if "locca" in self.losses else None
        return getattr(head, "decoder", None)

    # ---- the recipe's clock ------------------------------------------------------------
    @property
    def clock(self) -> RecipeClock:
        """This stage's `RecipeClock`, built when the Trainer is known (global batch, max_steps)."""
        if self._clock is None:
            self._clock = self.build_clock()
        return self._clock

    def build_clock(self, per_rank: int | None = None) -> RecipeClock:
        """From the Trainer (max_steps, world size, accumulation) and the per-rank batch size
        (the data module's `batch_size`, else the first batch's)."""
        trainer = self.trainer
        per_rank = per_rank or int(getattr(trainer.datamodule, "batch_size", 0) or 0) or self._first_batch
        if not per_rank:
            raise ValueError(
                "the recipe's clock needs the per-rank batch size: give the data module a "
                "`batch_size`, or build the clock after the first batch"
            )
        step_examples = per_rank * int(trainer.world_size) * int(trainer.accumulate_grad_batches)
        stage_steps = int(trainer.estimated_stepping_batches)
        opt = self.optim_config
        clock = self.clock_window.clock(
            stage_steps, step_examples, opt.warmup_steps, opt.min_lr_ratio, self.recipe_examples
        )
        mean = float(getattr(trainer.datamodule, "mean_batch_size", 0) or per_rank)  # NaFlex: some batches halved
        self.clock_window.warn_if_unfit(clock, stage_steps * step_examples * mean / per_rank, step_examples)
        return clock

    @property
    def recipe_examples(self) -> int | None:
        """The recipe's length in examples: `stage.clock.examples`, else the `init_from`
        checkpoint's, else None (then the clock counts this stage's own steps)."""
        return self.clock_window.examples or (self.init_source.recipe_examples if self.init_source else None)

    def window_steps(self, global_batch: int) -> int | None:
        """Optimiser steps of `global_batch` examples that cover this stage's window
        (`ClockWindow.steps`), or None while the recipe's length is unknown."""
        return self.clock_window.steps(self.recipe_examples, global_batch)

    def _lr_factor(self) -> float:
        if self._clock is None and not self._first_batch and not getattr(self.trainer.datamodule, "batch_size", 0):
            # Before the first batch of a run without a data module: the factor of step 0 does
            # not depend on the batch size (it is 1 / warmup steps), so one example per step will do.
            return self.build_clock(per_rank=1).lr_factor(0)
        return self.clock.lr_factor(self.examples_seen)

    @property
    def nominal_batch_size(self) -> int | None:
        """Per rank, the run's configured batch size (the data module's `nominal_batch_size`):
        what the sigmoid loss weights batches of other sizes to (`SigmoidLoss`,
        `stage.losses.sigmoid.nominal_negatives`). None outside a Trainer or without a data module."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(dm, "nominal_batch_size", None) or getattr(dm, "batch_size", None)
        return int(size) if size else None

    def sigmoid_nominal(self) -> int | None:
        """`nominal_batch_size` when `stage.losses.sigmoid.nominal_negatives` is on, else None."""
        cfg = self.loss_configs.get("sigmoid")
        return self.nominal_batch_size if cfg is not None and getattr(cfg, "nominal_negatives", False) else None

    @property
    def recipe_progress(self) -> float:
        """Recipe progress in [0, 1] after the examples seen so far (the progress bar shows it)."""
        if self.examples_seen == 0 and self._clock is None:
            return float(self.clock_window.window[0])
        return self.clock.progress(self.examples_seen)

    def enable_loss(self, name: str) -> None:
        """Switch a scheduled loss on: re-initialise its parameters, clear their optimiser
        state, then call `on_loss_enabled`. Runs once per loss per run (not again on resume).
        Under FSDP/DeepSpeed the optimiser state is sharded and owned by the strategy; the
        state of the local shards is what is cleared."""
        module = self.losses[name]
        # Re-initialised as built (the module's own init), into the same parameter tensors so
        # that DDP and the optimiser keep them; seeded by (run seed, loss name), so a run
        # resumed before the switch re-initialises exactly as an uninterrupted one. Written
        # through the strategy (FSDP: into the shards), with fresh optimiser state.
        seed = int(self.hparams.get("seed", 0)) * 1_000_003 + zlib.crc32(name.encode())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self.build_loss(name, self.loss_configs[name])
        sharding.reinit_module(self, module, fresh.state_dict())
        sharding.reset_optimizer_state(self, module.parameters())
        self.loss_enabled[name] = True
        self.on_loss_enabled(name)

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
        # FSDP2 (Lightning's ModelParallelStrategy): the stage shards itself (stages/fsdp2.py),
        # compiling the towers' blocks first when model.compile is set.
        from stages.fsdp2 import is_fsdp2, shard_stage

        if is_fsdp2(self):
            shard_stage(self)
            return
        if self.compile_towers and not getattr(self, "_compiled", False):
            self.model.vision_model.compile()
            self.model.text_model.compile()
            self._compiled = True

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """{name: (loss, metrics)} of every loss that is on, from one shared `StepContext`.
        uint8 pixels (a batch from a data module that did not normalise them on the device,
        or straight from the loader) are normalised first; float pixels pass unchanged."""
        ctx = self.context(normalize_pixels(batch))
        return {
            name: loss(**self.loss_inputs(name, ctx)) for name, loss in self.losses.items() if self.loss_enabled[name]
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        results = self.compute_losses(batch)
        bsz = batch_size(batch)
        # Everything is logged as a detached device tensor: no host sync here. Lightning turns
        # progress-bar metrics into Python numbers after *every* batch (a device sync per
        # step on GPU), so losses go to the bar only when there is a bar to show them.
        bar = getattr(self._trainer, "progress_bar_callback", None) is not None
        total = None
        for name, (loss, metrics) in results.items():
            weighted = self.loss_configs[name].effective_weight * loss
            total = weighted if total is None else total + weighted
            # sync_dist: under DDP the logged loss is the mean over ranks (the optimised
            # objective), not rank 0's share; one all-reduce of a scalar, no host sync.
            self.log(
                f"train/loss_{name}", loss.detach(), batch_size=bsz, prog_bar=bar and name == "sigmoid", sync_dist=True
            )
            for key, value in metrics.items():
                # self-distillation's metrics get their own W&B section (`distill/...`: each
                # loss, teacher-student agreement, centre and teacher entropies)
                self.log(key if key.startswith(OWN_SECTION) else f"train/{key}", value, batch_size=bsz)
        if total is None:
            raise RuntimeError(f"no loss is on at step {self.global_step}: check stage.losses.*.start_frac")
        dormant = [
            p
            for name, module in self.losses.items()
            if not self.loss_enabled[name]
            for p in module.parameters()
            if p.requires_grad
        ]
        world = int(self._trainer.world_size) if self._trainer is not None else 1
        strategy = getattr(self._trainer, "strategy", None)
        if dormant and (world > 1 or isinstance(strategy, ParallelStrategy)):
            # losses that join later: in the graph with weight 0 so that DDP's reducer gets every
            # gradient (it runs with one process too: `trainer=gpu_ddp trainer.devices=1`)
            total = total + 0.0 * sum(p.sum() for p in dormant)
        self.log("train/loss", total.detach(), batch_size=bsz, prog_bar=bar, sync_dist=True)
        self._first_batch = self._first_batch or bsz
        self.examples_seen += bsz * world
        return total

    def lr_gates(self) -> dict[str, bool]:
        """Parameter-name prefix -> whether those parameters are updated this step. Closed
        gates get lr 0 in their own optimiser groups (`siglip2.optim.param_groups`): no update
        and no weight decay, under every strategy (a sharded optimiser cannot see
        `grad = None`). Here: each loss's parameters while the loss is off; subclasses add more
        (pretraining: the frozen prototypes)."""
        return {f"losses.{n}.": on for n, on in self.loss_enabled.items()}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Dormant losses (in the graph with weight 0 for DDP's reducer) and frozen parameters:
        # their groups step with lr 0. The schedule's LambdaLR sets every group's lr again
        # after the step, so a closed gate lasts one step and is closed again here if needed.
        gates = self.lr_gates()
        inner = getattr(optimizer, "optimizer", optimizer)
        for group in inner.param_groups:
            gate = group.get("gate")
            if gate is None:
                continue
            is_open = gates.get(gate, True)
            if not is_open:
                group["lr"] = 0.0
            elif self._gates_open.get(gate) is False:
                # opened: the parameters start with fresh moments (DINO: a frozen layer has no
                # optimiser state until it first steps), as the loss switch does
                sharding.reset_optimizer_state(self, group["params"])
            self._gates_open[gate] = is_open

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # FSDP1: the norm is over every rank's shards, which only the root module can compute
        # (Lightning's FSDP precision plugin refuses `norm`); everything else: Lightning's own.
        root = sharding.fsdp_root(self)
        if root is not None and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        cfg = self.optim_config
        impl = adamw_impl(cfg.impl, self.trainer)
        optimizer = torch.optim.AdamW(
            param_groups(
                [(sharding.clean_name(n), p) for n, p in self.named_parameters()],
                cfg.torch_weight_decay,
                lr=float(cfg.lr),
                lr_mults=self.lr_multipliers(),
                ndims=self._param_ndims,
                gates=self.lr_gates(),
            ),
            lr=float(cfg.lr),
            betas=cfg.betas,
            eps=float(cfg.eps),
            fused=impl == "fused" or None,
            foreach=(impl == "foreach") if impl != "fused" else None,
        )
        # The factor reads the examples seen, not the step count: a half batch moves it half as far.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: self._lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint carries to be used without the run's config (`CheckpointMeta`):
        the configuration of the weights it holds (after any adaptation), the losses' configs,
        the loss phase, the recipe's clock, what `init_from` loaded and the tokenizer."""
        clock = self._clock
        return CheckpointMeta(
            format=CHECKPOINT_FORMAT,
            stage=self.stage_name,
            model=self.model.config.to_dict(),
            losses={n: to_dict(c) for n, c in self.loss_configs.items()},
            loss_enabled=dict(self.loss_enabled),
            examples_seen=int(self.examples_seen),
            recipe={
                "examples": clock.total_examples if clock else self.clock_window.examples,
                "window": list(self.clock_window.window),
                "stretch": self.clock_window.stretch,
                "progress": clock.progress(self.examples_seen) if clock else None,
            },
            init_from=self.init_record,
            tokenizer=self.tokenizer_record.to_dict() if self.tokenizer_record else None,
        ).to_dict()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["siglip2"] = self.checkpoint_meta()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = CheckpointMeta.read(checkpoint)
        meta.check_resumable(
            self.stage_name, self.model.config, bool(checkpoint.get("optimizer_states")), self.tokenizer_record
        )
        # FSDP and DeepSpeed load the weights themselves and take `state_dict` out first
        has_state = "state_dict" in checkpoint
        if has_state:
            checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        # Resume keeps the phase: modules exist from step 0, so no hook fires here.
        for name, enabled in meta.loss_enabled.items():
            if name in self.loss_enabled:
                self.loss_enabled[name] = bool(enabled)
        if meta.examples_seen is not None:
            self.examples_seen = int(meta.examples_seen)
        elif self._trainer is not None:  # format 1: constant batch, progress was global_step / max_steps
            trainer = self._trainer
            self.examples_seen = (
                int(checkpoint.get("global_step", 0))
                * int(getattr(trainer.datamodule, "batch_size", 0) or 0)
                * int(trainer.world_size)
            )
        if has_state:
            check_shapes(self.state_dict(), checkpoint["state_dict"], source="ckpt_path")
        self._warn_if_retimed(meta)

    def _warn_if_retimed(self, meta: CheckpointMeta) -> None:
        """Resuming with another trainer.max_steps (or batch, or world size) changes the recipe's
        length: progress, the loss switches, the hand-offs and the lr cosine follow the new one."""
        recorded = meta.recipe_examples
        if not recorded or self._trainer is None:
            return
        try:
            now = self.build_clock().total_examples
        except Exception:  # no batch size known yet: nothing to compare
            return
        if int(now) != int(recorded):
            seen = int(meta.examples_seen if meta.examples_seen is not None else self.examples_seen)
            log.warning(
                "ckpt_path: the checkpoint's recipe is %d examples long and this run's is %d (trainer.max_steps, "
                "batch or world size changed): recipe progress goes from %.1f%% to %.1f%%, and the loss "
                "switches, hand-off checkpoints and lr schedule follow the new length",
                int(recorded),
                int(now),
                100 * seen / int(recorded),
                100 * seen / int(now),
            )

    def load_weights(self, path: str) -> None:
        """`init_from`: weights only, a new optimiser, and the clock of this stage's window of
        the recipe the checkpoint belongs to (`siglip2.weights.init_from`: one of our checkpoints
        of any stage, or `hf:<folder>`, whose recipe length is unknown: then the clock comes
        from this stage's own steps unless `stage.clock.examples` is set). The record of what
        was loaded and adapted goes into this stage's checkpoints (`siglip2.init_from`)."""
        result = init_from(
            self, path, self.model.config, posemb_resize=self.posemb_resize, tokenizer=self.tokenizer_record
        )
        self.init_source, self.init_record = result.source, result.record
        self.on_weights_loaded(result.loaded)

    def on_weights_loaded(self, loaded: set[str]) -> None:
        """After `init_from`: `loaded` names the stage tensors that came from the source (a
        stage with an EMA teacher copies the student into a teacher the source did not hold)."""


def batch_size(batch: Mapping[str, Any]) -> int:
    """Examples a batch trains (ACID's super-batch records the part it trained as `trained_batch_size`)."""
    if "trained_batch_size" in batch:
        return int(batch["trained_batch_size"])
    for key in ("image", "patches", "text"):
        if key in batch:
            return int(batch[key].shape[0])
    raise KeyError("batch has neither image, patches nor text")


def plain_config(cfg: Any) -> Any:
    """Plain containers from OmegaConf nodes, so stages never depend on Hydra types."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {k: plain_config(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain_config(v) for v in cfg]
    return cfg
