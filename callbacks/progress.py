"""A training progress bar that counts optimiser steps, not epochs.

Streaming runs set `trainer.max_steps` and `max_epochs=-1`: an "epoch" is only
`data.batches_per_epoch` batches, so Lightning's bars read `Epoch 3` (TQDM) or `Epoch 3/-2`
(Rich) and restart every few hundred batches. `StepProgressBar` keeps one bar for the whole
run: `step 120/750 · recipe 16.0%`, total = `trainer.max_steps`, with Lightning's metrics as
the postfix. The recipe figure is the stage's `recipe_progress` (in [0, 1]: where this stage
is on the recipe's clock); a module without one shows `global_step / max_steps`.

Lightning refuses a progress-bar callback when `trainer.enable_progress_bar=false`, so the
config builds it through `progress_bar(enabled=${trainer.enable_progress_bar})`, which gives
a no-op callback when the bar is off.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar


def total_steps(trainer: pl.Trainer) -> int | None:
    """`trainer.max_steps`; for a run bounded by epochs instead, Lightning's estimate (None if unknown)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        estimate = trainer.estimated_stepping_batches
    except Exception:  # no data yet, or an unsized loader
        return None
    return int(estimate) if estimate is not None and math.isfinite(estimate) else None


def recipe_fraction(trainer: pl.Trainer, pl_module: pl.LightningModule, total: int | None) -> float | None:
    """The stage's `recipe_progress` if it has one, else `global_step / total` (None: unknown)."""
    try:
        progress = getattr(pl_module, "recipe_progress", None)
    except Exception:  # a stage whose clock is not built yet: the bar must never stop training
        progress = None
    if progress is not None:
        try:
            return float(progress)
        except (TypeError, ValueError):
            pass
    return trainer.global_step / total if total else None


def describe(step: int, total: int | None, fraction: float | None) -> str:
    text = f"step {step}/{total}" if total else f"step {step}"
    return text if fraction is None else f"{text} · recipe {100 * fraction:.1f}%"


class StepProgressBar(TQDMProgressBar):
    """TQDM bar over optimiser steps: `step N/max_steps · recipe P%`, one bar for the whole run."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        # One bar spans every (virtual) epoch, so it is never left behind per epoch.
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self._total: int | None = None
        self._shown: int | None = None

    def _show(self, trainer: pl.Trainer, pl_module: pl.LightningModule, force: bool = False) -> None:
        bar = self._train_progress_bar
        if bar is None or bar.disable:
            return
        step = trainer.global_step
        if not force and (step == self._shown or not self._should_update(step, self._total or 0)):
            return
        self._shown = step
        bar.total = self._total
        bar.n = step
        bar.set_description(
            describe(step, self._total, recipe_fraction(trainer, pl_module, self._total)), refresh=False
        )
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self._total = total_steps(trainer)
        self._shown = None
        # A resumed run starts at its restored step.
        self.train_progress_bar.reset(total=self._total)
        self.train_progress_bar.initial = trainer.global_step
        self._show(trainer, pl_module, force=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # no per-epoch reset: the bar counts steps over the whole run

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._show(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show(trainer, pl_module, force=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._show(trainer, pl_module, force=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show(trainer, pl_module, force=True)
        super().on_train_end(trainer, pl_module)


def progress_bar(enabled: bool = True, refresh_rate: int = 1, process_position: int = 0) -> Callback:
    """The config's entry point: a `StepProgressBar`, or a no-op callback when the Trainer's
    bar is off (`trainer.enable_progress_bar=false`), which Lightning requires."""
    if not enabled:
        return Callback()
    return StepProgressBar(refresh_rate=refresh_rate, process_position=process_position)
