"""The main SigLIP 2 pretraining stage [P §2.1-2.3].

Recipe in one screen (`conf/stage/pretrain.yaml`):
- `sigmoid` (from 0%): the student's pooled image and text embeddings of the batch.
- `locca` (from 0%, weight 1): the LocCa decoder on the same image pass's patch tokens.
- `local_to_global` (from 80%, weight 1 x size factor): the EMA teacher's head on one global
  view's pooled feature teaches the student's head on 8 local views' pooled features.
- `masked` (from 80%, weight 0.25 x size factor): the student sees the global view with 50%
  of its patches replaced by the mask token; at the masked positions its tokens match the
  teacher's tokens of the unmasked view.
Sigmoid and LocCa keep the original image; the views are cut on the device inside the step.
At the switch the teacher is copied from the student and the heads and mask token start
fresh (`Stage.enable_loss`); after every optimiser step the teacher follows the student by EMA.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import torch
from torch import nn

from siglip2.config import from_dict
from siglip2.data.views import DistillViews, ViewConfig, make_views
from siglip2.losses.distill import (
    LocalToGlobalConfig,
    LocalToGlobalLoss,
    MaskedPredictionConfig,
    MaskedPredictionLoss,
    teacher_temperature,
)
from siglip2.losses.locca import LoccaConfig, LoccaHead
from siglip2.losses.sigmoid import SigmoidLoss, SigmoidLossConfig
from siglip2.model.ema import EMATeacher
from siglip2.schedule import ema_momentum
from stages import sharding
from stages.base import Stage, StepContext

DISTILL = ("local_to_global", "masked")
log = logging.getLogger(__name__)


@dataclass
class EMAConfig:
    """`stage.ema`: teacher momentum, fixed (SILC; RECIPE.md) unless `final_momentum` is set
    (DINO's cosine from `momentum` to it over the distillation phase).

    `tower`: "ema" (the paper's teacher: the image tower follows the student) or "frozen": the
    teacher's image tower stays what the student was when distillation switched on (in a
    fine-tune: the loaded model, whatever teacher the source held; without init_from: the
    student at the switch), an EMA-free anchor that the student's local
    views keep matching, to limit forgetting (not in the paper; `experiment=finetune_anchored`).
    The teacher's heads follow the student's heads by EMA either way (DINO): a fixed random
    head would score the frozen features against prototypes nothing learns."""

    momentum: float = 0.996
    final_momentum: float | None = None
    tower: str = "ema"

    def __post_init__(self):
        if self.tower not in ("ema", "frozen"):
            raise ValueError(f"stage.ema.tower must be 'ema' or 'frozen', got {self.tower!r}")


class PretrainContext(StepContext):
    """The pretraining step's shared passes: the original image (sigmoid, LocCa) and, when a
    distillation loss is on, the views, the teacher's pass and the student's passes on them."""

    @cached_property
    def views(self) -> DistillViews:
        """Global view, local views (view-major) and patch mask, cut on the device."""
        s = self.stage
        return make_views(self.batch["image"], self.generator, s.views, patch_size=s.model.config.vision.patch_size)

    @cached_property
    def teacher_global(self):
        with torch.no_grad():
            return self.stage.teacher.vision(image=self.views.global_view)

    @cached_property
    def local_pooled(self) -> torch.Tensor:
        """(V, B, W) the student's pooled features of the V local views (one batched pass)."""
        b = self.batch["image"].shape[0]
        pooled = self.stage.model.encode_image(image=self.views.local_views).pooled
        return pooled.unflatten(0, (pooled.shape[0] // b, b))

    @cached_property
    def student_masked(self):
        s = self.stage
        return s.model.encode_image(
            image=self.views.global_view, masked_patches=self.views.mask, mask_token=s.losses["masked"].mask_token
        )


class PretrainStage(Stage):
    NAME = "pretrain"
    LOSSES = {
        "sigmoid": SigmoidLossConfig,
        "locca": LoccaConfig,
        "local_to_global": LocalToGlobalConfig,
        "masked": MaskedPredictionConfig,
    }

    def __init__(self, *args, views: Mapping[str, Any] | None = None, ema: Mapping[str, Any] | None = None, **kwargs):
        """`views`: `ViewConfig` keys (global/local crops, local size, jitter); `ema`:
        `EMAConfig` keys. Both are used only when a distillation loss is configured."""
        views_in = dict(views or {})
        views_cfg = dict(views_in)
        grid = views_cfg.pop("local_grid", None)  # local views of grid x grid tokens: size = grid x patch
        views_parsed = from_dict(ViewConfig, views_cfg, "stage.views")  # typos fail before anything is built
        self.ema = from_dict(EMAConfig, dict(ema or {}), "stage.ema")
        super().__init__(*args, **kwargs)
        if grid is not None:
            views_parsed = dataclasses.replace(views_parsed, local_size=int(grid) * self.model.config.vision.patch_size)
        self.views = views_parsed
        self.hparams["views"], self.hparams["ema"] = views_in, dict(ema or {})
        distill = [n for n in DISTILL if n in self.losses]
        # Built now, in every checkpoint and outside the optimiser (no grad) from step 0.
        self.teacher = (
            EMATeacher(self.model.vision_model, {n: self.losses[n].head for n in distill}) if distill else None
        )

    def build_loss(self, name: str, cfg) -> nn.Module:
        width = self.model.config.vision.width
        if name == "sigmoid":
            return SigmoidLoss(chunk_size=int(cfg.chunk_size))
        if name == "locca":
            return LoccaHead.for_model(cfg, self.model.config)
        if name == "local_to_global":
            return LocalToGlobalLoss(cfg, width)
        return MaskedPredictionLoss(cfg, width)

    def context(self, batch) -> PretrainContext:
        return PretrainContext(self, batch)

    def loss_inputs(self, name: str, ctx: PretrainContext) -> dict[str, Any]:
        if name == "sigmoid":  # student image and text embeddings
            return dict(
                image_emb=ctx.image.embeds,
                text_emb=ctx.text_emb,
                logit_scale=self.model.logit_scale.exp(),
                logit_bias=self.model.logit_bias,
                nominal_batch_size=self.sigmoid_nominal(),
            )
        if name == "locca":  # the same image pass's tokens, the batch's locca_* targets
            return dict(
                batch=ctx.batch, image_tokens=ctx.image.tokens, image_mask=ctx.image.token_mask, generator=ctx.generator
            )
        temp = teacher_temperature(self.loss_configs[name], self.recipe_progress)
        if name == "local_to_global":  # teacher: global view, pooled; student: local views, pooled
            with torch.no_grad():
                teacher_logits = self.teacher.heads[name](ctx.teacher_global.pooled)
            return dict(student_pooled=ctx.local_pooled, teacher_logits=teacher_logits, teacher_temp=temp)
        # masked: tokens at the masked positions only (gathered before the heads)
        # (B, K) masked positions per image (a fixed count per image: no host sync), in the order
        # `mask.nonzero` would give them
        masked = ctx.views.masked_positions(self.views.mask_ratio)
        image_index = torch.arange(masked.shape[0], device=masked.device).repeat_interleave(
            masked.shape[1], output_size=masked.numel()
        )
        position = masked.reshape(-1)
        with torch.no_grad():
            teacher_logits = self.teacher.heads[name](ctx.teacher_global.tokens[image_index, position])
        return dict(
            student_tokens=ctx.student_masked.tokens[image_index, position],
            teacher_logits=teacher_logits,
            image_index=image_index,
            batch_size=ctx.views.mask.shape[0],
            teacher_temp=temp,
        )

    # ---- the teacher ---------------------------------------------------------------------
    def distill_heads(self) -> dict[str, nn.Module]:
        return {n: self.losses[n].head for n in DISTILL if n in self.losses}

    def on_loss_enabled(self, name: str) -> None:
        if name in DISTILL:  # the teacher starts as the student (heads just re-initialised)
            self.teacher.copy_from(self.model.vision_model, self.distill_heads())

    def setup(self, stage: str) -> None:
        super().setup(stage)
        sharding.teacher_setup(self)  # before the strategy wraps the stage (DeepSpeed: keeps fp32 values)

    def on_fit_start(self) -> None:
        sharding.teacher_setup(self)  # after it (DeepSpeed: the teacher back to fp32)

    def on_weights_loaded(self, loaded: set[str]) -> None:
        # A source without a teacher (released weights, a checkpoint from before 80%): the
        # teacher starts as the loaded student, as at the switch. A frozen tower is the loaded
        # model whatever teacher the source holds (ours before 80% holds its random init's copy).
        if self.teacher is None:
            return
        if self.ema.tower == "frozen":
            self.teacher.copy_from(self.model.vision_model, self.distill_heads())
            log.info("init_from: stage.ema.tower=frozen: the teacher's image tower is the loaded model and stays it")
        elif not any(k.startswith("teacher.") for k in loaded):
            self.teacher.copy_from(self.model.vision_model, self.distill_heads())
            log.info("init_from: no EMA teacher in the source; the teacher starts as the loaded student")

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.teacher is not None and any(self.loss_enabled[n] for n in DISTILL if n in self.losses):
            start = min(self.loss_configs[n].start_frac for n in DISTILL if n in self.losses)
            m = ema_momentum(self.recipe_progress, self.ema.momentum, self.ema.final_momentum, start=start)
            self.teacher.update(self.model.vision_model, self.distill_heads(), m, tower=self.ema.tower == "ema")
            # only on logging steps: a Python number becomes a device tensor (a copy that waits) when logged
            if self.global_step % max(1, int(self.trainer.log_every_n_steps)) == 0:
                self.log("distill/ema_momentum", m)

    def lr_gates(self) -> dict[str, bool]:
        # DINO: the prototype layer gets no update for the first `freeze_prototypes` of the phase.
        gates = super().lr_gates()
        progress = self.recipe_progress
        for name in DISTILL:
            if name in self.losses:
                cfg = self.loss_configs[name]
                frozen = progress < cfg.start_frac + cfg.freeze_prototypes * (cfg.end_frac - cfg.start_frac)
                gates[f"losses.{name}.head.prototypes"] = self.loss_enabled[name] and not frozen
        return gates

    def lr_multipliers(self) -> dict[str, float]:
        return {f"losses.{n}.": self.loss_configs[n].head_lr_mult for n in DISTILL if n in self.losses}

    def measure_flops(self, batch_size: int) -> int:
        """Towers plus one decoder pass (with the vocabulary projection) per LocCa task."""
        flops = super().measure_flops(batch_size)
        if "locca" not in self.losses:
            return flops
        from lightning.fabric.utilities.throughput import measure_flops

        config = self.model.config
        n_img = (config.vision.image_size // config.vision.patch_size) ** 2
        with torch.device("meta"):
            head = LoccaHead.for_model(self.loss_configs["locca"], config)
            tokens = torch.zeros(batch_size, head.decoder.max_len, dtype=torch.long)
            image_tokens = torch.empty(batch_size, n_img, config.vision.width)

        def forward() -> torch.Tensor:
            return head.decoder.head(head.decoder(tokens, image_tokens)).sum()

        return flops + len(head.objective.tasks) * measure_flops(head, forward, loss_fn=lambda y: y)
