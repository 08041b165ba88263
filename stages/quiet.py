"""Known, understood messages of the libraries we run on, silenced so a run's own lines are
read (issue 27: they drowned them). Each filter names why the message does not apply here;
anything else still shows.

- Lightning's "Found N module(s) in eval mode": the EMA teacher of self-distillation is frozen
  in eval mode on purpose (`siglip2.model.ema`).
- Lightning's "`IterableDataset` has `__len__` defined": our loaders split shards by rank and
  worker and define `__len__` as the batches each rank gets (`siglip2.data.shards`).
- Lightning's "`isinstance(treespec, LeafSpec)` is deprecated": inside Lightning's own
  pytree helper with this torch; nothing of ours.
- Lightning's "💡 Tip: ... litlogger" advertisement (an INFO line, not a warning).
- ModelCheckpoint's "The dirpath has changed from ... won't be reloaded": every run, a resumed
  one too, writes into its own new folder, and we keep every checkpoint (`save_top_k: -1`), so
  there is no best-k bookkeeping to lose. (Lightning's warning about resuming mid-epoch with
  a non-resumable loader is kept: it is true of our streams.)
"""

from __future__ import annotations

import logging
import warnings

_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Your `IterableDataset` has `__len__` defined",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The dirpath has changed from",
)


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_known_noise() -> None:
    """Install the filters (idempotent). Called by `stages.runner.run` and `evaluate`, so in
    every rank a launcher starts."""
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTip) for f in logger.filters):
            logger.addFilter(_DropTip())
