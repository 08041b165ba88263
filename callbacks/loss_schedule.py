"""Turns each stage's losses on at their scheduled fraction of training.

The recipe switches self-distillation and masked prediction on at 80% of the run; the
fraction is `global_step / trainer.estimated_stepping_batches`, so it follows max_steps and
any resume. The on/off state also lives in the checkpoint (see `stages.base.Stage`).
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class LossSchedule(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        total = max(1, int(trainer.estimated_stepping_batches))
        frac = trainer.global_step / total
        for name, spec in pl_module.loss_specs.items():
            if not pl_module.loss_enabled[name] and frac >= float(spec["start_frac"]):
                pl_module.loss_enabled[name] = True
                pl_module.on_loss_enabled(name)
                log.info("loss '%s' on at step %d (%.1f%% of training)", name, trainer.global_step, 100 * frac)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("train/progress", frac)
            for name, on in pl_module.loss_enabled.items():
                pl_module.log(f"schedule/{name}_on", float(on))

    def state_dict(self) -> dict[str, Any]:
        return {}
