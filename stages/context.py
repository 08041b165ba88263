"""`StepContext`: one training step's shared forward passes, each computed once, on first use."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch


class StepContext:
    """One training step's shared forward passes, each computed once, on first use.

    Losses never run towers themselves: the stage hands each loss what it needs from here
    (`Stage.loss_inputs`), so a pass no enabled loss asks for is never computed. The batch's
    pixels are float in [-1, 1] already (`Stage.compute_losses` normalises uint8 batches with
    `siglip2.data.transforms.normalize_pixels`, the one normalisation point).
    """

    def __init__(self, stage: Any, batch: Mapping[str, Any]):
        """`stage`: the `stages.base.Stage` whose `model` runs the passes; `batch`: its batch."""
        self.stage, self.batch = stage, batch

    @cached_property
    def image(self):
        """`ImageOutput` of the student on the batch's images (`.embeds`, `.tokens`, `.token_mask`)."""
        b = self.batch
        if "patches" in b:
            return self.stage.model.encode_image(
                patches=b["patches"],
                patch_coord=b.get("patch_coord"),
                patch_valid=b.get("patch_valid"),
                spatial_shapes=b.get("spatial_shapes"),
            )
        return self.stage.model.encode_image(image=b["image"])

    @cached_property
    def text_emb(self) -> torch.Tensor:
        """(B, D) normalised text embeddings of the batch's captions."""
        return self.stage.model.embed_text(self.batch["text"])

    @cached_property
    def generator(self) -> torch.Generator:
        return self.stage.step_generator()
