"""Reports the data pipeline's skipped samples by reason (corrupt image, empty caption, ...).

Workers count skips; the counts ride along with each batch and are folded here, so a
run with bad shards shows how much it lost instead of crashing or hiding it.
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L

from siglip2.data.shards import SkipStats

log = logging.getLogger(__name__)


class DataSkipLogging(L.Callback):
    def __init__(self) -> None:
        self.stats = SkipStats()
        self._reported = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(batch, dict):
            return
        self.stats.update(batch)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            totals = self.stats.totals()
            for reason, count in totals.items():
                pl_module.log(f"data/skipped_{reason}", float(count), reduce_fx="sum")
            n = sum(totals.values())
            if n > self._reported:
                log.warning("data: %d samples skipped so far on this rank: %s", n, totals)
                self._reported = n

    @property
    def final_metrics(self) -> dict[str, float]:
        return {f"data/skipped_{k}": float(v) for k, v in self.stats.totals().items()}
