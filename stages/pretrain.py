"""The main SigLIP 2 pretraining stage [P §2.1-2.3].

Recipe in one screen: the sigmoid image-text loss on the student's pooled embeddings, plus
the LocCa decoder's captioning, referring-expression and grounded-captioning losses on the
same forward pass's un-pooled image tokens, with equal weight from step 0
(`conf/stage/pretrain.yaml`). Self-distillation and masked prediction join at 80% (the
distillation issue adds them here).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from siglip2.losses.locca import LoccaConfig, LoccaHead
from siglip2.losses.sigmoid import SigmoidLoss, SigmoidLossConfig
from stages.base import Stage, StepContext


class PretrainStage(Stage):
    NAME = "pretrain"
    LOSSES = {"sigmoid": SigmoidLossConfig, "locca": LoccaConfig}

    def build_loss(self, name: str, cfg) -> nn.Module:
        if name == "sigmoid":
            return SigmoidLoss(chunk_size=int(cfg.chunk_size))
        return LoccaHead.for_model(cfg, self.model.config)

    def loss_inputs(self, name: str, ctx: StepContext) -> dict[str, Any]:
        if name == "sigmoid":  # student image and text embeddings
            return dict(image_emb=ctx.image.embeds, text_emb=ctx.text_emb,
                        logit_scale=self.model.logit_scale.exp(), logit_bias=self.model.logit_bias)
        # locca: the same image pass's tokens, the batch's locca_* targets
        return dict(batch=ctx.batch, image_tokens=ctx.image.tokens, image_mask=ctx.image.token_mask,
                    generator=ctx.generator)

    def measure_flops(self, batch_size: int) -> int:
        """Towers plus one decoder pass (with the vocabulary projection) per LocCa task."""
        flops = super().measure_flops(batch_size)
        if "locca" not in self.losses:
            return flops
        from lightning.fabric.utilities.throughput import measure_flops

        config = self.model.config
        n_img = (config.vision.image_size // config.vision.patch_size) ** 2
        with torch.device("meta"):
            head = LoccaHead.for_model(self.loss_configs["locca"], config)
            tokens = torch.zeros(batch_size, head.decoder.max_len, dtype=torch.long)
            image_tokens = torch.empty(batch_size, n_img, config.vision.width)

        def forward() -> torch.Tensor:
            return head.decoder.head(head.decoder(tokens, image_tokens)).sum()

        return flops + len(head.objective.tasks) * measure_flops(head, forward, loss_fn=lambda y: y)
