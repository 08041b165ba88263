"""Train one SigLIP 2 stage: `python train.py stage=pretrain model=tiny data=demo ...`.

Compose (Hydra), instantiate, fit, write metrics.json. No training logic lives here.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from stages.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
