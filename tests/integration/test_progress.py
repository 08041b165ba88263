"""The training bar counts optimiser steps out of max_steps (streaming: max_epochs=-1), not epochs."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import StepProgressBar, progress_bar

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 7
BATCHES_PER_EPOCH = 3  # a virtual epoch of a stream: the run spans 3 of them


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TinyWithRecipe(Tiny):
    """A stage on the recipe's clock: this stage covers recipe progress 0.5 -> 0.57."""

    @property
    def recipe_progress(self) -> float:
        return 0.5 + self.trainer.global_step / 100


class Spy(Callback):
    """Reads the bar after it has drawn each batch (callbacks run in list order)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback.train_progress_bar
        desc = bar.desc.removesuffix(": ")  # tqdm appends ": " to a description
        self.seen.append((trainer.global_step, bar.n, bar.total, desc, bar.postfix))


def fit(module, tmp_path):
    data = TensorDataset(torch.randn(BATCHES_PER_EPOCH * 2, 4), torch.randn(BATCHES_PER_EPOCH * 2, 1))
    spy = Spy()
    trainer = pl.Trainer(
        max_steps=MAX_STEPS,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[StepProgressBar(), spy],
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert trainer.global_step == MAX_STEPS and trainer.current_epoch >= 2  # several virtual epochs
    return spy.seen


@pytest.mark.parametrize(
    "module, fraction",
    [
        (TinyWithRecipe, lambda step: 0.5 + step / 100),  # the stage's recipe_progress
        (Tiny, lambda step: step / MAX_STEPS),  # fallback: global_step / max_steps
    ],
)
def test_bar_shows_steps_out_of_max_steps_and_recipe_progress(tmp_path, capsys, module, fraction):
    seen = fit(module(), tmp_path)
    assert [s[0] for s in seen] == list(range(1, MAX_STEPS + 1))
    for step, n, total, desc, postfix in seen:
        assert (n, total) == (step, MAX_STEPS), (n, total)  # no reset at virtual epoch ends
        assert desc == f"step {step}/{MAX_STEPS} · recipe {100 * fraction(step):.1f}%", desc
        assert "train/loss" in postfix, postfix  # Lightning's metrics postfix is kept
    out = capsys.readouterr().out
    assert f"step {MAX_STEPS}/{MAX_STEPS}" in out
    assert "Epoch" not in out and "/-2" not in out, out[-500:]


def test_bar_with_a_broken_recipe_progress_falls_back(tmp_path):
    class NoClock(Tiny):
        @property
        def recipe_progress(self):
            raise RuntimeError("clock not built")

    seen = fit(NoClock(), tmp_path)
    assert seen[-1][3] == f"step {MAX_STEPS}/{MAX_STEPS} · recipe 100.0%"


def test_a_progress_bar_callback_needs_enable_progress_bar():
    """Why the config builds the bar through `progress_bar(enabled=...)`."""
    with pytest.raises(MisconfigurationException):
        pl.Trainer(enable_progress_bar=False, callbacks=[StepProgressBar()], logger=False)
    trainer = pl.Trainer(enable_progress_bar=False, callbacks=[progress_bar(enabled=False)], logger=False)
    assert trainer.progress_bar_callback is None


@pytest.mark.parametrize(
    "overrides, enabled",
    [
        ([], True),
        (["debug=fast"], True),  # the 6-step smoke shows its bar too (issue 27)
        (["trainer.enable_progress_bar=false"], False),
    ],
)
def test_config_wires_the_step_bar_and_respects_enable_progress_bar(overrides, enabled, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.trainer.enable_progress_bar is enabled
    bar = instantiate(cfg.callbacks.progress_bar)
    assert isinstance(bar, StepProgressBar) is enabled
    trainer = pl.Trainer(
        enable_progress_bar=cfg.trainer.enable_progress_bar, callbacks=[bar], logger=False, default_root_dir=tmp_path
    )
    assert (trainer.progress_bar_callback is bar) is enabled
