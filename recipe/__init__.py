"""The SigLIP 2 recipe as one command: a chain of stages, each its own `train.py` run.

`python train.py experiment=recipe_demo` composes a config with a `recipe:` block (its yaml is
`conf/experiment/recipe_*.yaml`; the block's format is in `recipe.chain`) and
`stages.runner.run` hands it to `run_recipe` instead of training. Each stage of the chain is a
separate process (`python train.py <its overrides>`, so DDP's launcher and SLURM see an
ordinary run) with its own output folder under one recipe folder; stages hand off through
checkpoints as DESIGN.md says (pretraining's `frac_0.95.ckpt` -> resolution adaptation,
`frac_0.90.ckpt` -> NaFlex, a finished model + a bigger teacher -> ACID) [P §2.4-2.5].

This package is the chain's process orchestration, not a training stage (those are `stages/`):

- `recipe.chain`: the recipe block -> `ChainStage`s, `ckpt:` references, each stage's Hydra
  overrides and the command line's own overrides;
- `recipe.local`: the stages as local subprocesses, resumable after a kill, with the attempts
  record, the summary table and `recipe.json` (`run_recipe`, the entry point);
- `recipe.slurm`: the chain as SLURM jobs with dependencies (`hydra/launcher=slurm`).

docs/recipe.md ("The whole recipe in one command") is the user's guide.
"""

from recipe.local import run_recipe

__all__ = ["run_recipe"]
