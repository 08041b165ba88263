"""A pretraining stage with one extra loss that joins later: the test module of the
"modules that join later" mechanism (the distillation issue brings the real ones).

`probe`: a Linear head on the student's image embedding regressing the (detached) text
embedding, so it has parameters of its own, takes a shared forward pass and can learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from siglip2.schedule import LossTiming
from stages.pretrain import PretrainStage


@dataclass
class ProbeLossConfig(LossTiming):
    start_frac: float = 0.5


class ProbeLoss(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, dim)

    def forward(self, image_emb: torch.Tensor, target: torch.Tensor):
        loss = (self.head(image_emb) - target).pow(2).sum(-1).mean()
        return loss, {"probe/loss": loss.detach()}


class ProbeStage(PretrainStage):
    LOSSES = {**PretrainStage.LOSSES, "probe": ProbeLossConfig}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches: list[tuple[str, int]] = []  # (loss, global step) each time the hook fires

    def build_loss(self, name, cfg):
        if name == "probe":
            return ProbeLoss(self.model.config.embed_dim)
        return super().build_loss(name, cfg)

    def loss_inputs(self, name, ctx):
        if name == "probe":
            return dict(image_emb=ctx.image.embeds, target=ctx.text_emb.detach())
        return super().loss_inputs(name, ctx)

    def on_loss_enabled(self, name: str) -> None:
        self.switches.append((name, self.global_step))
