"""Reports the data pipeline's skipped samples by reason (corrupt image, empty caption, ...).

Workers count skips; the counts ride along with each batch and are folded here, so a
run with bad shards shows how much it lost instead of crashing or hiding it. Samples left out
on purpose (``filtered_*`` reasons, e.g. a balance table's drops) are logged as
``data/<reason>`` beside ``data/skipped_<reason>`` for bad data, and are not warned about.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from siglip2.data.shards import SkipStats, is_filter_reason

log = logging.getLogger(__name__)


class DataSkipLogging(L.Callback):
    def __init__(self) -> None:
        self.stats = SkipStats()
        self._reported = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict):
            return
        self.stats.update(batch)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            totals = self.stats.totals()
            for reason, count in totals.items():
                pl_module.log(_metric(reason), float(count), reduce_fx="sum")
            bad = {k: v for k, v in totals.items() if not is_filter_reason(k)}
            n = sum(bad.values())
            if n > self._reported:
                log.warning("data: %d samples skipped so far on this rank: %s", n, bad)
                self._reported = n

    @property
    def final_metrics(self) -> dict[str, float]:
        return {_metric(k): float(v) for k, v in self.stats.totals().items()}


def _metric(reason: str) -> str:
    return f"data/{reason}" if is_filter_reason(reason) else f"data/skipped_{reason}"
