"""The main SigLIP 2 pretraining stage [P §2.1-2.3].

Recipe in one screen: the sigmoid image-text loss, plus the LocCa decoder's captioning,
referring-expression and grounded-captioning losses on the un-pooled image tokens, with
equal weight from step 0. Which losses are on, and their weights, come from
`conf/stage/pretrain.yaml` through `callbacks.LossSchedule`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from siglip2.losses.sigmoid import SigmoidLoss
from stages.base import Stage
from stages.locca import LoccaHead


class PretrainStage(Stage):
    def __init__(self, model: Mapping[str, Any], optim: Mapping[str, Any], losses: Mapping[str, Any], **kwargs):
        super().__init__(model, optim, losses, **kwargs)
        specs = self.loss_specs
        self.sigmoid = SigmoidLoss(chunk_size=int(specs["sigmoid"].get("chunk_size", 4096)))
        self.locca = LoccaHead(self.hparams["model"], specs["locca"]) if "locca" in specs else None

    def compute_losses(self, batch: dict[str, Any]):
        image = self.model.encode_image(image=batch["image"])
        text_emb = F.normalize(self.model.encode_text(batch["text"]), dim=-1)
        image_emb = F.normalize(image.pooled, dim=-1)
        results = {
            "sigmoid": self.sigmoid(image_emb, text_emb, self.model.logit_scale.exp(), self.model.logit_bias)
        }
        if self.locca is not None and self.loss_enabled.get("locca", False):
            results["locca"] = self.locca(batch, image.tokens, image.token_mask, self.step_generator())
        return results

    def measure_flops(self, batch_size: int) -> int:
        """Towers plus one decoder pass (with the vocabulary projection) per LocCa task."""
        flops = super().measure_flops(batch_size)
        if self.locca is None:
            return flops
        from lightning.fabric.utilities.throughput import measure_flops

        cfg = self.hparams["model"]
        n_img = (cfg["vision"]["image_size"] // cfg["vision"]["patch_size"]) ** 2
        with torch.device("meta"):
            head = LoccaHead(cfg, self.loss_specs["locca"])
            tokens = torch.zeros(batch_size, head.decoder.max_len, dtype=torch.long)
            image_tokens = torch.empty(batch_size, n_img, cfg["vision"]["width"])

        def forward() -> torch.Tensor:
            return head.decoder.head(head.decoder(tokens, image_tokens)).sum()

        return flops + len(head.objective.tasks) * measure_flops(head, forward, loss_fn=lambda y: y)

    def locca_decoder(self):
        return self.locca.decoder if self.locca is not None else None

    @torch.no_grad()
    def embed(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """Normalised embeddings for evaluation."""
        out = {}
        if image is not None:
            out["image"] = F.normalize(self.model.encode_image(image=image).pooled, dim=-1)
        if text is not None:
            out["text"] = F.normalize(self.model.encode_text(text), dim=-1)
        return out
