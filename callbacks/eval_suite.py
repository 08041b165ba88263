"""Zero-shot classification, retrieval and referring-expression numbers during training.

Runs every `every_n_steps` optimiser steps and once when training ends, on every rank (the
evaluation is DDP-aware), logs the numbers to every logger, a per-class accuracy table and a
few images with their top predictions to W&B, and hands the final numbers to metrics.json.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from siglip2.eval.suite import evaluate_all, load_eval_set
from stages.sharding import plain_model

log = logging.getLogger(__name__)


class EvalSuite(L.Callback):
    def __init__(
        self,
        sets: list[str],
        every_n_steps: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        max_batches: int | None = None,
        num_examples: int = 8,
        naflex_seq_len: int | None = None,
        refexp_probe: dict | None = None,
    ):
        """`naflex_seq_len`: evaluate NaFlex-style (own aspect ratio, at most that many patches).
        `refexp_probe`: train a fresh decoder on the frozen tower for refexp sets (`eval.refexp_probe`),
        in the evaluation when training ends only."""
        sets = [sets] if isinstance(sets, str) else sets  # eval.sets=/a.yaml without brackets
        self.sets = [load_eval_set(s) for s in (sets or [])]
        self.every_n_steps = int(every_n_steps or 0)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.max_batches = max_batches
        self.num_examples = num_examples
        self.naflex_seq_len = int(naflex_seq_len) if naflex_seq_len else None
        self.refexp_probe = None if refexp_probe is None else dict(refexp_probe)
        self.final_metrics: dict[str, float] = {}
        self._last_step, self._probed = -1, False

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> dict[str, float]:
        """`final`: the evaluation when training ends, the only one that runs the refexp probe
        (it trains a decoder: too costly for every `every_n_steps`)."""
        probe = self.refexp_probe if final and any(s.task == "refexp" for s in self.sets) else None
        if not self.sets or (trainer.global_step == self._last_step and (probe is None or self._probed)):
            return self.final_metrics
        self._last_step, self._probed = trainer.global_step, probe is not None
        datamodule = trainer.datamodule
        # the towers run outside the training forward: under a sharded strategy an unsharded copy
        model, decoder = plain_model(pl_module)
        results = evaluate_all(
            self.sets,
            model=model,
            tokenizer=datamodule.tokenizer,
            image_size=datamodule.image_size,
            device=pl_module.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            max_batches=self.max_batches,
            decoder=decoder,
            keep_examples=self.num_examples if trainer.is_global_zero else 0,
            naflex_seq_len=self.naflex_seq_len,
            refexp_probe=probe,
        )
        tables, examples = results.pop("_tables", {}), results.pop("_examples", {})
        numbers = {k: float(v) for k, v in results.items()}
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=trainer.global_step)
        if trainer.is_global_zero:
            self._log_wandb(trainer, pl_module, tables, examples)
            log.info(
                "eval at step %d: %s",
                trainer.global_step,
                ", ".join(f"{k}={v:.3f}" for k, v in sorted(numbers.items())),
            )
        self.final_metrics = numbers
        return numbers

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module, final=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_device = pl_module.device
        if not self.sets and trainer.is_global_zero:
            log.info(
                "no evaluation sets (eval=none, or your own data without eval.sets): training ends without "
                "evaluation numbers; name sets with eval.sets='[/path/to/set.yaml]' (docs/eval_data.md), "
                "or evaluate the checkpoint later with eval.py"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from its final checkpoint (e.g. a recipe stage killed during its final
        # evaluation) skips training, and Lightning then calls no on_train_end: evaluate here,
        # on the device training used (teardown has moved the model off it).
        if self.sets and self._last_step == -1:
            device = pl_module.device
            pl_module.to(getattr(self, "_fit_device", device))
            try:
                self.evaluate(trainer, pl_module, final=True)
            finally:
                pl_module.to(device)

    @staticmethod
    def _log_wandb(trainer: L.Trainer, pl_module: L.LightningModule, tables: dict, examples: dict) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        wb = wandb_loggers[0]
        for name, rows in tables.items():
            wb.log_table(
                key=f"{name}/per_class",
                columns=_TABLE_COLUMNS.get(name.split("/")[0], ["class", "value"]),
                data=rows,
                step=trainer.global_step,
            )
        for name, items in examples.items():
            if items:
                items = [it for it in items if "image" in it]  # NaFlex evaluation keeps no square view
                if not items:
                    continue
                images = [((it["image"].float().clamp(-1, 1) + 1) / 2) for it in items]
                captions = [f"true: {it['label']} | top: {', '.join(it['top'])}" for it in items]
                wb.log_image(key=f"{name}/examples", images=images, caption=captions, step=trainer.global_step)
        rows = [
            [name, it.get("label", ""), it["caption"]]
            for name, items in examples.items()
            for it in items
            if "caption" in it
        ]
        if rows:
            wb.log_text(
                key="locca/captions", columns=["set", "label", "generated caption"], data=rows, step=trainer.global_step
            )


# What each task's `_tables` rows hold (siglip2.eval.suite), as W&B column names.
_TABLE_COLUMNS = {
    "zeroshot": ["class", "accuracy"],
    "segmentation": ["class", "IoU"],
    "representation_bias": ["attribute value", "share of images"],
    "association_bias": ["concept (| attribute value)", "gap (or P)"],
}
