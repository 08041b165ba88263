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
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import lightning as L
from lightning.pytorch.strategies import ParallelStrategy
import torch
from torch import nn

from siglip2.config import from_dict, to_dict
from siglip2.data.transforms import normalize_pixels
from siglip2.model import build_model
from siglip2.model.adapt import adapt_vision_weights, architecture_differences
from siglip2.model.posemb import POSEMB_RESIZE
from siglip2.model.layers import EncoderLayer
from siglip2.model.two_tower import SigLIP2Config
from siglip2.optim import OptimConfig, param_groups
from siglip2.schedule import LossTiming, RecipeClock
from stages import sharding

log = logging.getLogger(__name__)

# 3: the optimiser's parameter groups also split by lr gate (dormant losses, frozen prototypes),
# so the optimiser state of formats 1-2 does not fit: such checkpoints load weights (init_from,
# eval, export) but cannot resume.
CHECKPOINT_FORMAT = 3
# Metric prefixes logged as they are (their own W&B section), not under `train/`.
OWN_SECTION = ("distill/",)


def fsdp_wrap_classes() -> set[type[nn.Module]]:
    """The FSDP units (conf/trainer/fsdp.yaml): each transformer block, and each image tower and
    distillation head as a whole. The last two make the EMA teacher's units the same shape as
    the student's (a `VisionTransformer` and a `DINOHead` each), so that every teacher shard
    holds the same elements as its student shard and the EMA update runs shard by shard."""
    from siglip2.losses.distill import DINOHead
    from siglip2.model.decoder import DecoderLayer
    from siglip2.model.vit import VisionTransformer

    return {EncoderLayer, DecoderLayer, VisionTransformer, DINOHead}


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


@dataclass
class RecipeWindow:
    """A stage's place in the recipe (see `siglip2.schedule`): `window` in recipe progress,
    `stretch` = stage examples per recipe example, `examples` = the recipe's length in
    examples (None: from the checkpoint `init_from` names, else from this stage's max_steps).
    `fit_window`: the stage trains exactly the steps its window holds (`trainer.max_steps` is
    replaced by ceil(window examples x stretch / global batch)) when the recipe's length is
    known (from `examples` or the `init_from` checkpoint). `lr`, `rewarm_warmup`,
    `rewarm_peak`: the stage's lr over its window (`siglip2.schedule.RecipeClock`: "recipe",
    the paper's, or "rewarm", a fresh warmup + cosine over the stage, not the paper's)."""
    window: tuple[float, float] = (0.0, 1.0)
    stretch: float = 1.0
    examples: int | None = None
    fit_window: bool = False
    lr: str = "recipe"
    rewarm_warmup: float = 0.1
    rewarm_peak: float = 1.0

    def __post_init__(self):
        """Every value checked when the stage is built, each error naming its `stage.recipe.*` key."""
        window = tuple(self.window) if isinstance(self.window, (list, tuple)) else None
        if (window is None or len(window) != 2 or not all(isinstance(v, (int, float)) for v in window)
                or not 0.0 <= window[0] < window[1] <= 1.0):
            raise ValueError(f"stage.recipe.window must be [start, end] in recipe progress with "
                             f"0 <= start < end <= 1, got {self.window!r}")
        self.window = (float(window[0]), float(window[1]))
        if not self.stretch > 0:
            raise ValueError(f"stage.recipe.stretch must be > 0, got {self.stretch!r}")
        if self.examples is not None and not int(self.examples) > 0:
            raise ValueError(f"stage.recipe.examples must be > 0 (or null), got {self.examples!r}")
        if self.lr not in ("recipe", "rewarm"):
            raise ValueError(f"stage.recipe.lr must be 'recipe' (the paper's) or 'rewarm', got {self.lr!r}")
        if not 0.0 <= self.rewarm_warmup < 1.0:
            raise ValueError(f"stage.recipe.rewarm_warmup must lie in [0, 1), got {self.rewarm_warmup!r}")
        if not self.rewarm_peak > 0:
            raise ValueError(f"stage.recipe.rewarm_peak must be > 0, got {self.rewarm_peak!r}")


class StepContext:
    """One training step's shared forward passes, each computed once, on first use.

    Losses never run towers themselves: the stage hands each loss what it needs from here
    (`Stage.loss_inputs`), so a pass no enabled loss asks for is never computed.
    """

    def __init__(self, stage: "Stage", batch: Mapping[str, Any]):
        self.stage, self.batch = stage, batch

    @cached_property
    def image(self):
        """`ImageOutput` of the student on the batch's images (`.embeds`, `.tokens`, `.token_mask`)."""
        b = self.batch
        if "patches" in b:
            patches = b["patches"]
            if patches.dtype == torch.uint8:  # NaFlex batches carry pixels; [-1, 1] on the device
                patches = patches.float().div_(127.5).sub_(1.0)
            return self.stage.model.encode_image(patches=patches, patch_coord=b.get("patch_coord"),
                                                 patch_valid=b.get("patch_valid"),
                                                 spatial_shapes=b.get("spatial_shapes"))
        return self.stage.model.encode_image(image=b["image"])

    @cached_property
    def text_emb(self) -> torch.Tensor:
        """(B, D) normalised text embeddings of the batch's captions."""
        return self.stage.model.embed_text(self.batch["text"])

    @cached_property
    def generator(self) -> torch.Generator:
        return self.stage.step_generator()


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
        recipe: Mapping[str, Any] | None = None,
        compile: bool | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
        posemb_resize: str = "hf",
        optim_overrides: Mapping[str, Any] | None = None,
    ):
        """`model`: the model yaml as a dict; its `compile` key (`model.compile=true`)
        torch.compiles the towers (`compile` here is the old `stage.compile` flag, kept so that
        checkpoints saved with it still load). `optim`: `OptimConfig` keys. `losses`: loss name
        -> its config keys (`LOSSES`). `recipe`: `RecipeWindow` keys. `posemb_resize`: how
        `init_from` resizes a checkpoint's position table to this model's grid ("hf" or
        "bv_zoom", `siglip2.model.posemb.resize_posemb`). `optim_overrides`: the stage's own
        optimiser keys over `optim` (ACID: lr 1e-5, no weight decay). Unknown names or keys raise
        `ValueError` naming them, before anything is built."""
        super().__init__()
        name = name or self.NAME
        model_cfg = _to_dict(model)
        model_cfg["compile"] = bool(model_cfg.get("compile", False) or compile)
        if model_cfg.get("text", {}).get("vocab_size") is None:
            if vocab_size is None:
                raise ValueError("model.text.vocab_size is null and no tokenizer vocab size was given")
            model_cfg["text"]["vocab_size"] = int(vocab_size)
        overrides = _to_dict(optim_overrides or {})
        if overrides:
            log.info("stage %s sets its own optimiser keys over optim: %s", name, overrides)
        optim = {**_to_dict(optim), **overrides}
        self.optim_config = from_dict(OptimConfig, optim, "optim")
        self.recipe = from_dict(RecipeWindow, _to_dict(recipe or {}), "stage.recipe")
        if posemb_resize not in POSEMB_RESIZE:
            raise ValueError(f"stage.posemb_resize must be one of {POSEMB_RESIZE}, got {posemb_resize!r}")
        self.posemb_resize = posemb_resize
        # a loss set to null (`losses: {masked: null}`, `stage.losses.masked=null`) is not built
        self.loss_configs = self.parse_losses({k: v for k, v in _to_dict(losses).items() if v is not None})
        SigLIP2Config.from_dict(model_cfg)  # unknown model keys fail here, before any compute
        self.save_hyperparameters(
            {"model": model_cfg, "optim": _to_dict(optim), "losses": _to_dict(losses), "name": name,
             "handoff_fractions": list(handoff_fractions or []), "recipe": _to_dict(recipe or {}),
             "seed": int(seed), "posemb_resize": posemb_resize}
        )
        self.stage_name = name
        self.model = build_model(model_cfg)
        self.losses = nn.ModuleDict({n: self.build_loss(n, c) for n, c in self.loss_configs.items()})
        # Each parameter's ndim as built, before any strategy flattens it into shards: which
        # parameters decay is decided by it (FSDP1 hands the optimiser 1-D views).
        self._param_ndims = {n: p.ndim for n, p in self.named_parameters()}
        self._gates_open: dict[str, bool] = {}
        # Which losses are on; LossSchedule flips these and the checkpoint keeps them.
        self.loss_enabled: dict[str, bool] = {n: RecipeClock.loss_on(c, self.recipe.window[0])
                                              for n, c in self.loss_configs.items()}
        self.compile_towers = model_cfg["compile"]
        self.flops_per_batch: int | None = None
        self.examples_seen = 0  # this stage's training examples, all ranks (the recipe's clock)
        self.init_meta: dict[str, Any] = {}  # the `siglip2` entry of the init_from checkpoint
        # the run's tokenizer (path, sha256, vocab size; set by stages.runner.build): recorded in
        # every checkpoint so that eval, export and later stages use the same ids
        self.tokenizer_record: dict[str, Any] | None = None
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
            raise ValueError("the recipe's clock needs the per-rank batch size: give the data module a "
                             "`batch_size`, or build the clock after the first batch")
        step_examples = per_rank * int(trainer.world_size) * int(trainer.accumulate_grad_batches)
        total = self.recipe.examples or self.init_meta.get("recipe", {}).get("examples")
        opt = self.optim_config
        clock = RecipeClock.for_stage(
            stage_steps=int(trainer.estimated_stepping_batches), step_examples=step_examples,
            warmup=opt.warmup_steps, window=tuple(self.recipe.window), stretch=self.recipe.stretch,
            min_lr_ratio=opt.min_lr_ratio, total_examples=int(total) if total else None, lr=self.recipe.lr,
            rewarm_warmup=self.recipe.rewarm_warmup, rewarm_peak=self.recipe.rewarm_peak)
        mean = float(getattr(trainer.datamodule, "mean_batch_size", 0) or per_rank)  # NaFlex: some batches halved
        planned = int(trainer.estimated_stepping_batches) * step_examples * mean / per_rank
        if abs(planned - clock.stage_examples) > step_examples:
            log.warning("this stage trains %d examples but its window %s of a %d-example recipe holds %.0f: "
                        "the schedule will %s", planned, clock.window, clock.total_examples, clock.stage_examples,
                        "stop at the window's end early" if planned > clock.stage_examples else "end unfinished")
        return clock

    def window_steps(self, global_batch: int) -> int | None:
        """Optimiser steps of `global_batch` examples that cover this stage's window (the last
        one may overrun the window's end, where the clock stops), or None while the recipe's
        length is unknown (no `recipe.examples`, no `init_from` checkpoint recording it)."""
        total = self.recipe.examples or self.init_meta.get("recipe", {}).get("examples")
        if not total:
            return None
        start, end = self.recipe.window
        return max(1, math.ceil((end - start) * int(total) * self.recipe.stretch / int(global_batch)))

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
            return float(self.recipe.window[0])
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
        return {name: loss(**self.loss_inputs(name, ctx))
                for name, loss in self.losses.items() if self.loss_enabled[name]}

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
            self.log(f"train/loss_{name}", loss.detach(), batch_size=bsz, prog_bar=bar and name == "sigmoid",
                     sync_dist=True)
            for key, value in metrics.items():
                # self-distillation's metrics get their own W&B section (`distill/...`: each
                # loss, teacher-student agreement, centre and teacher entropies)
                self.log(key if key.startswith(OWN_SECTION) else f"train/{key}", value, batch_size=bsz)
        if total is None:
            raise RuntimeError(f"no loss is on at step {self.global_step}: check stage.losses.*.start_frac")
        dormant = [p for name, module in self.losses.items() if not self.loss_enabled[name]
                   for p in module.parameters() if p.requires_grad]
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
            param_groups([(sharding.clean_name(n), p) for n, p in self.named_parameters()], cfg.torch_weight_decay,
                         lr=float(cfg.lr), lr_mults=self.lr_multipliers(), ndims=self._param_ndims,
                         gates=self.lr_gates()),
            lr=float(cfg.lr), betas=cfg.betas, eps=float(cfg.eps),
            fused=impl == "fused" or None,
            foreach=(impl == "foreach") if impl != "fused" else None,
        )
        # The factor reads the examples seen, not the step count: a half batch moves it half as far.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: self._lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint carries to be used without the run's config (`siglip2.checkpoint`):
        the configuration of the weights it holds (after any adaptation), the losses' configs,
        the loss phase and the recipe's clock."""
        clock = self._clock
        return {
            "format": CHECKPOINT_FORMAT,
            "stage": self.stage_name,
            "model": self.model.config.to_dict(),
            "losses": {n: to_dict(c) for n, c in self.loss_configs.items()},
            "loss_enabled": dict(self.loss_enabled),
            "examples_seen": int(self.examples_seen),
            "recipe": {"examples": clock.total_examples if clock else self.recipe.examples,
                       "window": list(self.recipe.window), "stretch": self.recipe.stretch,
                       "progress": clock.progress(self.examples_seen) if clock else None},
            "init_from": self.init_meta.get("init_from_record"),
            "tokenizer": self.tokenizer_record,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["siglip2"] = self.checkpoint_meta()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from siglip2.checkpoint import upgrade_state_dict

        meta = checkpoint.get("siglip2", {})
        if meta.get("stage") not in (None, self.stage_name):
            raise ValueError(
                f"ckpt_path resumes the same stage, but this checkpoint is from stage '{meta['stage']}' "
                f"and this run is stage '{self.stage_name}'. Use init_from=... to start a new stage from it."
            )
        if "model" in meta:  # another resolution, patch size or architecture: name what differs
            diff = architecture_differences(SigLIP2Config.from_dict(meta["model"]), self.model.config)
            if diff:
                raise ValueError(
                    "ckpt_path resumes the same run, but the checkpoint's model differs from this run's in "
                    + ", ".join(f"{k} ({a} in the checkpoint, {b} here)" for k, (a, b) in diff.items())
                    + ". To continue these weights at another resolution, start a stage from them with init_from=...")
        self.check_tokenizer(meta.get("tokenizer"), "ckpt_path")
        if int(meta.get("format", 1)) < 3 and checkpoint.get("optimizer_states"):
            raise ValueError(
                f"ckpt_path: this checkpoint is format {meta.get('format', 1)}, written before the optimiser's parameter "
                "groups were split by lr gate (format 3), so its optimiser state does not fit this version and the run "
                "cannot resume exactly. Continue its weights with init_from=<ckpt> and stage.recipe.examples / the same "
                "stage window instead (a new optimiser, the clock from the checkpoint).")
        # FSDP and DeepSpeed load the weights themselves and take `state_dict` out first
        has_state = "state_dict" in checkpoint
        if has_state:
            checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        # Resume keeps the phase: modules exist from step 0, so no hook fires here.
        for name, enabled in meta.get("loss_enabled", {}).items():
            if name in self.loss_enabled:
                self.loss_enabled[name] = bool(enabled)
        if "examples_seen" in meta:
            self.examples_seen = int(meta["examples_seen"])
        elif self._trainer is not None:  # format 1: constant batch, progress was global_step / max_steps
            trainer = self._trainer
            self.examples_seen = int(checkpoint.get("global_step", 0)) * int(
                getattr(trainer.datamodule, "batch_size", 0) or 0) * int(trainer.world_size)
        if has_state:
            check_shapes(self.state_dict(), checkpoint["state_dict"], source="ckpt_path")
        self._warn_if_retimed(meta)

    def _warn_if_retimed(self, meta: Mapping[str, Any]) -> None:
        """Resuming with another trainer.max_steps (or batch, or world size) changes the recipe's
        length: progress, the loss switches, the hand-offs and the lr cosine follow the new one."""
        recorded = (meta.get("recipe") or {}).get("examples")
        if not recorded or self._trainer is None:
            return
        try:
            now = self.build_clock().total_examples
        except Exception:  # no batch size known yet: nothing to compare
            return
        if int(now) != int(recorded):
            seen = int(meta.get("examples_seen", self.examples_seen))
            log.warning("ckpt_path: the checkpoint's recipe is %d examples long and this run's is %d (trainer.max_steps, "
                        "batch or world size changed): recipe progress goes from %.1f%% to %.1f%%, and the loss "
                        "switches, hand-off checkpoints and lr schedule follow the new length", int(recorded),
                        int(now), 100 * seen / int(recorded), 100 * seen / int(now))

    def load_weights(self, path: str) -> None:
        """`init_from`: weights only, a new optimiser, and the clock of this stage's window of
        the recipe the checkpoint belongs to. `path` is one of our checkpoints (any stage) or
        `hf:<folder>`, a `transformers.Siglip2Model` folder (`load_hf_weights`).

        The image towers (student and EMA teacher) are fitted to this run's resolution and
        patch size (`siglip2.model.adapt`); any other difference of the model (depth, width,
        vocabulary, text length) is a `ValueError` naming the fields. The record of what was
        loaded and adapted goes into this stage's checkpoints (`siglip2.init_from`)."""
        if str(path).startswith("hf:"):
            self.load_hf_weights(str(path)[3:])
            return
        from siglip2.checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
        self.check_tokenizer(ckpt.meta.get("tokenizer"), f"init_from={path}")
        self.check_vocab_size(int(ckpt.model_config.text.vocab_size), f"init_from={path}")
        state, notes = adapt_vision_weights(ckpt.state_dict, ckpt.model_config, self.model.config,
                                            posemb_resize=self.posemb_resize, what=f"init_from={path}")
        own = self.state_dict()
        check_shapes(own, state, source=f"init_from={path}", allow_missing=True)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if len(own) == len(missing):
            raise ValueError(f"init_from={path}: no tensor of this stage's model is in the checkpoint")
        towers = [k for k in missing if k.startswith("model.")]
        if towers:  # only the losses' modules and the EMA teacher may start fresh, never the towers
            raise ValueError(f"init_from={path}: the checkpoint lacks {len(towers)} tensors of the model itself "
                             f"({', '.join(towers[:5])}{', ...' if len(towers) > 5 else ''}); only loss modules "
                             "(LocCa decoder, distillation heads) and the EMA teacher may start fresh")
        log.info("init_from %s (stage %s): %d tensors loaded, %d not in checkpoint, %d ignored%s",
                 path, ckpt.stage, len(own) - len(missing), len(missing), len(unexpected),
                 f" (modules this stage does not have: {', '.join(_module_prefixes(unexpected))})" if unexpected else "")
        for note in notes:
            log.info("init_from: adapted %s", note)
        self.init_meta = dict(ckpt.meta)
        self.init_meta["init_from_record"] = {"path": str(path), "stage": ckpt.stage, "adapted": notes,
                                              "not_in_checkpoint": sorted(missing), "ignored": sorted(unexpected)}
        self.on_weights_loaded(set(own) - set(missing))

    def load_hf_weights(self, folder: str) -> None:
        """`init_from=hf:<folder>`: a `transformers.Siglip2Model` folder (safetensors + config,
        e.g. a downloaded `google/siglip2-*-naflex` or our own export) into the towers, logit
        scale and bias, adapted to this run's resolution like a checkpoint. Everything else
        (LocCa decoder, distillation heads) was never released and starts as built; the log
        says so. The recipe's length is not in the folder: the clock comes from this stage's
        own steps unless `stage.recipe.examples` is set."""
        from siglip2.export.hf import from_hf

        hf = from_hf(folder)
        self.check_vocab_size(int(hf.config.text.vocab_size), f"init_from=hf:{folder}")
        state = {f"model.{k}": v for k, v in hf.state_dict().items()}
        state, notes = adapt_vision_weights(state, hf.config, self.model.config, posemb_resize=self.posemb_resize,
                                            prefixes=("model.vision_model.",), what=f"HF model {folder}")
        own = self.state_dict()
        check_shapes(own, state, source=f"init_from=hf:{folder}", allow_missing=True)
        missing, _ = self.load_state_dict(state, strict=False)
        fresh = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in missing if not k.startswith("teacher.")})
        log.info("init_from hf:%s: %d tensors of the two towers loaded; starting fresh (never released): %s",
                 folder, len(state), ", ".join(fresh) or "nothing")
        for note in notes:
            log.info("init_from: adapted %s", note)
        import json
        import os
        from pathlib import Path

        config = Path(folder) / "config.json"  # its layout, for the export back (siglip2.export)
        kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        where = os.path.abspath(folder) if os.path.isdir(folder) else folder
        self.init_meta = {"init_from_record": {"path": f"hf:{where}", "stage": "hf",
                                               "model_type": kind, "adapted": notes,
                                               "not_in_checkpoint": sorted(missing), "ignored": []}}
        self.on_weights_loaded(set(state))

    def check_tokenizer(self, record: Mapping[str, Any] | None, source: str) -> None:
        """A checkpoint trained with other token ids (same vocabulary size or not) is refused,
        naming both tokenizers; checkpoints that record none are accepted."""
        mine = self.tokenizer_record
        if not record or not mine or record.get("sha256") == mine.get("sha256"):
            return
        raise ValueError(f"{source} was trained with the tokenizer {record.get('path')} (sha256 "
                         f"{str(record.get('sha256'))[:12]}, {record.get('vocab_size')} tokens); this run's is "
                         f"{mine.get('path')} (sha256 {str(mine.get('sha256'))[:12]}, {mine.get('vocab_size')} tokens): "
                         "its token ids would mean other words. Use the same tokenizer (tokenizer.path=...)")

    def check_vocab_size(self, theirs: int, source: str) -> None:
        """Weights with another vocabulary size than this run's tokenizer are a `ValueError`
        naming both, before any tensor is compared."""
        mine = int(self.model.config.text.vocab_size)
        if theirs != mine:
            path = (self.tokenizer_record or {}).get("path", "tokenizer.path")
            raise ValueError(f"{source} has a vocabulary of {theirs} tokens but this run's tokenizer ({path}) has "
                             f"{mine}: use the tokenizer those weights were trained with (tokenizer.path=...)")

    def on_weights_loaded(self, loaded: set[str]) -> None:
        """After `init_from`: `loaded` names the stage tensors that came from the source (a
        stage with an EMA teacher copies the student into a teacher the source did not hold)."""

def _module_prefixes(keys, depth: int = 2) -> list[str]:
    """The distinct leading `depth` name parts of state-dict keys (`teacher.vision`, ...)."""
    return sorted({".".join(k.split(".")[:depth]) for k in keys})


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
    """Examples a batch trains (ACID's super-batch records the part it trained as `trained_batch_size`)."""
    if "trained_batch_size" in batch:
        return int(batch["trained_batch_size"])
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
