"""A callback the DeepSpeed tests add to a `train.py` run (tests/ is on the runs' path): it
records, on every rank, what the switch at 80% and the EMA teacher did under the engine, and
writes `probe_rank<r>.json` to `out`.

- `teacher_dtypes`: the EMA teacher's parameter dtypes when training starts and at the end.
- at the switch (the first batch with distillation on, after `LossSchedule` re-initialised the
  heads): the heads' parameters as the module holds them (`reinit`) and the optimiser's fp32
  master of each (`deepspeed.utils.safe_get_full_fp32_param`; a collective, every rank calls it);
- `lr`: the largest group lr when the switch step starts (before the schedule's next value);
- after that step: `drift` = max |head - reinit| (the step moved the re-initialised values by
  about one lr; had the engine written its old masters back, they would sit far away), the
  masters again, and `ema_residual` = max |teacher - (m teacher_before + (1 - m) student)| in
  fp32 (0 up to rounding when the teacher holds fp32; a bf16 teacher loses the update);
  `teacher_moved` = max |teacher - teacher_before|.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

DISTILL = ("local_to_global", "masked")


def _heads(stage) -> dict[str, torch.nn.Parameter]:
    return {f"losses.{n}.{k}": p for n in DISTILL if n in stage.losses for k, p in stage.losses[n].named_parameters()}


def _masters(stage, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor] | None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(stage.trainer.strategy, DeepSpeedStrategy):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return {k: safe_get_full_fp32_param(p).detach().clone() for k, p in params.items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


class SwitchProbe(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.record: dict = {}
        self._switch_step: int | None = None

    def on_train_start(self, trainer, stage):
        self.record["teacher_dtypes"] = {"start": sorted({str(p.dtype) for p in stage.teacher.parameters()})}
        self.record["student_dtypes"] = sorted({str(p.dtype) for p in stage.model.parameters()})

    def on_train_batch_start(self, trainer, stage, batch, batch_idx):
        if self._switch_step is not None or not all(stage.loss_enabled[n] for n in DISTILL):
            return
        self._switch_step = trainer.global_step
        heads = _heads(stage)
        self._reinit = {k: p.detach().float().clone() for k, p in heads.items()}
        masters = _masters(stage, heads)
        self._teacher = [p.detach().clone() for p in stage.teacher.parameters()]
        self.record.update(
            switch_step=self._switch_step,
            lr=max(float(g["lr"]) for g in trainer.optimizers[0].param_groups),
            reinit_vs_master=None if masters is None else _max_diff(self._reinit, masters),
        )

    def on_train_batch_end(self, trainer, stage, outputs, batch, batch_idx):
        if self._switch_step is None or trainer.global_step != self._switch_step + 1:
            return
        heads = _heads(stage)
        now = {k: p.detach().float().clone() for k, p in heads.items()}
        masters = _masters(stage, heads)
        m = float(stage.ema.momentum)
        teacher = list(stage.teacher.parameters())
        student = list(stage.model.vision_model.parameters()) + [
            p for n in DISTILL if n in stage.losses for p in stage.losses[n].head.parameters()
        ]
        residual = max(
            float((t.float() - (m * t0.float() + (1 - m) * s.detach().float())).abs().max())
            for t, t0, s in zip(teacher, self._teacher, student)
        )
        moved = max(float((t.float() - t0.float()).abs().max()) for t, t0 in zip(teacher, self._teacher))
        scale = max(float(t.float().abs().max()) for t in teacher)
        self.record.update(
            drift=_max_diff(now, self._reinit),
            module_vs_master=None if masters is None else _max_diff(now, masters),
            ema_residual=residual,
            teacher_moved=moved,
            teacher_scale=scale,
            momentum=m,
        )

    def on_train_end(self, trainer, stage):
        self.record["teacher_dtypes"]["end"] = sorted({str(p.dtype) for p in stage.teacher.parameters()})
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(self.record, indent=1))
