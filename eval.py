"""Evaluate any checkpoint: `python eval.py ckpt_path=PATH eval=demo`.

Prints a table of zero-shot, retrieval and referring-expression numbers and writes them to
metrics.json in the run's output directory.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from stages.runner import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
