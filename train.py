"""Train one SigLIP 2 stage: `python train.py stage=pretrain model=tiny data=demo ...`.

Compose (Hydra), instantiate, fit, write metrics.json. No training logic lives here.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from siglip2.cli import user_errors
from stages.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors("train.py"):  # a clear message, exit 1, no traceback (SIGLIP2_TRACEBACK=1)
        return run(cfg)


if __name__ == "__main__":
    import sys

    from stages.overrides import exit_on_bad_overrides

    exit_on_bad_overrides("train.py", "train", sys.argv[1:])  # typos and bad values, named, before Hydra
    main()
