"""Turns each stage's losses on (and off) where the recipe's clock says.

Self-distillation and masked prediction join at 80% of the recipe. Progress is the stage's
`recipe_progress` (examples seen, `siglip2.schedule.RecipeClock`), read before each batch;
the switch calls `Stage.enable_loss` once (re-initialised parameters, cleared optimiser
state). The on/off state lives in the checkpoint, so a resumed run is in the same phase and
the switch never fires twice.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from siglip2.schedule import RecipeClock

log = logging.getLogger(__name__)


class LossSchedule(L.Callback):
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        progress = pl_module.recipe_progress
        for name, cfg in pl_module.loss_configs.items():
            on = RecipeClock.loss_on(cfg, progress)
            if on and not pl_module.loss_enabled[name]:
                pl_module.enable_loss(name)
                log.info("loss '%s' on at step %d (%.1f%% of the recipe)", name, trainer.global_step, 100 * progress)
            elif not on and pl_module.loss_enabled[name]:
                pl_module.loss_enabled[name] = False
                log.info("loss '%s' off at step %d (%.1f%% of the recipe)", name, trainer.global_step, 100 * progress)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("train/progress", progress)
            pl_module.log("train/examples_seen", float(pl_module.examples_seen))
            for name, on in pl_module.loss_enabled.items():
                pl_module.log(f"schedule/{name}_on", float(on))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # metrics.json holds the final state, not the last *logged* value (logged every
        # log_every_n_steps, before the step: the switch or the last batch could be missed)
        self.final_metrics = {
            "train/progress": float(pl_module.recipe_progress),
            "train/examples_seen": float(pl_module.examples_seen),
            **{f"schedule/{n}_on": float(on) for n, on in pl_module.loss_enabled.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {}
