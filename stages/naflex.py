"""NaFlex [P §2.4.2]: one model for native aspect ratios and several sequence lengths.

`python train.py stage=naflex init_from=<pretrain>/checkpoints/frac_0.90.ckpt` continues the
90% checkpoint with the sigmoid and LocCa losses only (no self-distillation or masked
prediction: the paper's NaFlex variant), the last 10% of the pretraining cosine stretched
3.75x (`stage.clock`). The data come as padded patch sequences (`siglip2.data.naflex`): each
batch's length is drawn from `stage.naflex.seq_lens` by a seeded plan, the same on every
rank, and each image is resized to the largest size of its own aspect ratio that fits; the
position table is resized per distinct patch grid of the batch
(`siglip2.model.posemb.posemb_for_batch`, HF's bilinear + antialias), and attention, the
MAP head and the LocCa decoder ignore the padding. Progress is counted in examples, so the
halved batches at the largest length move the schedule by half a step.

The distillation heads and EMA teacher of the 90% checkpoint are not part of this stage:
`init_from` leaves them out and its log and the checkpoint's record list them as ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

from siglip2.config import from_dict
from siglip2.data.naflex import NaFlexConfig
from siglip2.losses.locca import LoccaConfig
from siglip2.losses.sigmoid import SigmoidLossConfig
from stages.pretrain import PretrainStage


class NaFlexStage(PretrainStage):
    NAME = "naflex"
    LOSSES = {"sigmoid": SigmoidLossConfig, "locca": LoccaConfig}

    def __init__(self, *args, naflex: Mapping[str, Any] | None = None, **kwargs):
        """`naflex`: `NaFlexConfig` keys (sequence lengths, batching); the data module reads
        the same block to plan its batches (`stages.runner.stage_data_inputs` passes it)."""
        self.naflex = from_dict(NaFlexConfig, dict(naflex or {}), "stage.naflex")
        super().__init__(*args, **kwargs)
        self.hparams["naflex"] = dict(naflex or {})

    def training_step(self, batch, batch_idx):
        if "patches" not in batch:
            raise ValueError(
                "stage=naflex needs NaFlex batches (patches, patch_coord, patch_valid, spatial_shapes): "
                "the data module needs the stage's naflex block (stages.runner.stage_data_inputs passes it)"
            )
        if "spatial_shapes" in batch:
            self.log("train/naflex_seq_len", float(batch["patches"].shape[1]), batch_size=batch["patches"].shape[0])
        return super().training_step(batch, batch_idx)
