"""The LocCa decoder and its three-task objective as one module a stage can hold [P §2.2].

The decoder has the text tower's width and `depth_ratio` of its depth (half in the paper),
cross-attends to the image tower's un-pooled tokens, and is trained from step 0 with the
same weight as the sigmoid loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from siglip2.losses.locca import LoccaObjective
from siglip2.model.decoder import LoccaDecoder


class LoccaHead(nn.Module):
    def __init__(self, model_cfg: Mapping[str, Any], spec: Mapping[str, Any]):
        super().__init__()
        text, vision = model_cfg["text"], model_cfg["vision"]
        targets = dict(spec.get("targets") or {})
        depth = max(1, round(int(text["depth"]) * float(spec.get("depth_ratio", 0.5))))
        self.decoder = LoccaDecoder(
            width=int(text["width"]), depth=depth, heads=int(text["heads"]), mlp_dim=int(text["mlp_dim"]),
            vocab_size=int(text["vocab_size"]), max_len=int(targets.get("max_len", text["max_len"])),
            image_width=int(vision["width"]),
        )
        self.objective = LoccaObjective(
            weights=spec.get("task_weights"), parallel_prob=float(spec.get("parallel_prob", 0.5)),
            chunk_size=int(spec.get("chunk_size", 1024)),
        )

    def forward(self, batch: Mapping[str, Any], image_tokens: torch.Tensor, image_mask: torch.Tensor | None,
                generator: torch.Generator | None = None):
        return self.objective(self.decoder, image_tokens, image_mask, batch, generator=generator)
