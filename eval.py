"""Evaluate any checkpoint: `python eval.py ckpt_path=PATH eval=demo`.

Prints a table of zero-shot, retrieval and referring-expression numbers and writes them to
metrics.json in the run's output directory.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from siglip2.cli import user_errors

if __name__ == "__main__":
    import os

    from stages.overrides import exit_on_bad_overrides

    os.environ.setdefault("PROJECT_ROOT", os.getcwd())  # conf/paths: logs/ under the directory run from

    exit_on_bad_overrides("eval.py", "eval", sys.argv[1:])  # typos and bad values, named, before Hydra
    if not any(a in ("-h", "--help", "--cfg", "-c", "--info", "-i") for a in sys.argv[1:]):
        print("eval.py: loading torch and Lightning ...", file=sys.stderr, flush=True)  # ~10 s on a small CPU
from stages.runner import evaluate  # noqa: E402  (imported eagerly: Lightning sets its logging up on import)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors("eval.py"):  # a clear message, exit 1, no traceback (SIGLIP2_TRACEBACK=1)
        evaluate(cfg)


if __name__ == "__main__":
    main()
