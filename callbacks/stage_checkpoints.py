"""Saves the hand-off checkpoints the later stages start from (`frac_0.90.ckpt`, `frac_0.95.ckpt`),
the final weights as `last.ckpt` when training ends, and a resumable `last.ckpt` when the run
is stopped by SIGTERM (preemption, `kill`, a scheduler's time limit): Lightning notes the
signal, finishes the current step and raises `SIGTERMException` on every rank at the same
step; this callback saves there and `stages.runner.run` then exits with code 143 (128 +
SIGTERM), never 0. Resume with `ckpt_path=<run>/checkpoints/last.ckpt`. In a single-process run
the first Ctrl-C (SIGINT) takes the same path (the step finishes, `last.ckpt` is saved, exit code
130); a second Ctrl-C stops at once, as Lightning does. Multi-process runs keep Lightning's
Ctrl-C handling (no checkpoint; the periodic ones stay).

NaFlex continues from 90% of pretraining and resolution adaptation from 95% [P §2.4]: each
is written after the first step that brings the recipe's progress to its fraction. They
are written through `trainer.save_checkpoint`, which writes atomically and works under every
strategy (DeepSpeed and FSDP need all ranks to take part).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class StageCheckpoints(L.Callback):
    def __init__(self, dirpath: str, fractions: list[float] | None = None):
        self.dirpath = Path(dirpath)
        self.fractions = sorted(float(f) for f in (fractions or []))
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"hand-off fraction {f} must lie in (0, 1]")
        self.saved: set[float] = set()
        self.interrupted = False  # the first Ctrl-C of a single-process run was taken as SIGTERM
        self._previous_sigint: Any = None

    @staticmethod
    def filename(frac: float) -> str:
        return f"frac_{frac:.2f}.ckpt"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop now, as Lightning does
            self._restore_sigint()
            raise KeyboardInterrupt
        self.interrupted = True
        log.warning("Ctrl-C: finishing this step and saving last.ckpt (Ctrl-C again to stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: stop at the step's end

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        progress = pl_module.recipe_progress  # after this batch: the recipe's clock, in examples
        for frac in self.fractions:
            if frac not in self.saved and progress >= frac:
                path = self.dirpath / self.filename(frac)
                trainer.save_checkpoint(path, weights_only=False)  # the full, resumable checkpoint
                self.saved.add(frac)
                if trainer.is_global_zero:  # every rank writes its part; one line in the shared log
                    log.info("hand-off checkpoint %s at step %d", path, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint writes last.ckpt only at its interval: with max_steps not a multiple
        # of it, the final weights would be in no file. Every rank takes part (DeepSpeed/FSDP).
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the full, resumable checkpoint
        _claim_last(trainer, path)
        if trainer.is_global_zero:
            log.info("final checkpoint %s at step %d", path, trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # the full, resumable checkpoint
            if trainer.is_global_zero:
                log.warning(
                    "%s: saved %s at step %d; resume with ckpt_path=%s",
                    "Ctrl-C" if self.interrupted else "SIGTERM",
                    path,
                    trainer.global_step,
                    path,
                )

    def state_dict(self) -> dict[str, Any]:
        return {"saved": sorted(self.saved)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = set(state_dict.get("saved", []))


def _claim_last(trainer: L.Trainer, path: Path) -> None:
    """Tell each `ModelCheckpoint(save_last=True)` writing to the same folder that `path` is its
    last checkpoint. Lightning runs checkpoint callbacks after the others; one that never
    saved at its interval (a run shorter than `every_n_train_steps`) would otherwise save the
    same step again at train end, as `last-v1.ckpt` beside ours (it finds last.ckpt taken)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and Path(cb.dirpath) == path.parent:
            cb.last_model_path = str(path)
            cb._last_checkpoint_saved = str(path)  # what its on_train_end checks (lightning 2.x)
