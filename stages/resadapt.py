"""Resolution adaptation [P §2.4.1]: the fixed-resolution variants.

`python train.py stage=resadapt init_from=<pretrain>/checkpoints/frac_0.95.ckpt
model.vision.image_size=384` continues pretraining's 95% checkpoint at another resolution
(and, with `model.vision.patch_size=14`, another patch size) to the end of the recipe, with
every pretraining loss on (sigmoid, LocCa, local-to-global, masked prediction). What changes
is done when the weights are loaded (`Stage.load_weights`, `siglip2.model.adapt`): the position
table is resized to the new patch grid (`stage.posemb_resize`: HF's bilinear + antialias, or
big_vision's `bv_zoom`) and the patch embedding PI-resized, for the student and the EMA teacher
alike. The lr follows the pretraining cosine from 95% to 100% (`stage.clock.window`), and the
stage trains the steps that window holds (`clock.fit_window`). Its checkpoints record the
adapted configuration, so eval and export rebuild the model at the new resolution.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from stages.pretrain import PretrainStage

log = logging.getLogger(__name__)


class ResAdaptStage(PretrainStage):
    NAME = "resadapt"

    def __init__(self, model: Mapping[str, Any], *args, posemb_grid: int | str = "auto", **kwargs):
        """`posemb_grid`: side of the learned position table of the adapted model; "auto" =
        image_size // patch_size (the target grid, as the released 384 px models: 24x24 at /16,
        27x27 at /14, whose last 6 px the patch conv does not see)."""
        model = _with_grid(model, posemb_grid)
        super().__init__(model, *args, **kwargs)
        self.hparams["posemb_grid"] = posemb_grid


def _with_grid(model: Mapping[str, Any], posemb_grid: int | str) -> dict[str, Any]:
    from stages.base import plain_config

    cfg = plain_config(model)
    vision = dict(cfg["vision"])
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    if size < patch:
        raise ValueError(f"model.vision.image_size {size} is smaller than one patch ({patch} px)")
    grid = size // patch if posemb_grid == "auto" else int(posemb_grid)
    if grid != vision.get("posemb_grid"):
        log.info(
            "resadapt: position table %s -> %dx%d (image %d px / patch %d)",
            vision.get("posemb_grid"),
            grid,
            grid,
            size,
            patch,
        )
    vision["posemb_grid"] = grid
    return {**cfg, "vision": vision}
