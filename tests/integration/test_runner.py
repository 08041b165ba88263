"""`stages.runner`: the global batch comes from the built Trainer's world size (not the
config's `devices` literal), and a run without an experiment logger works."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
GPUS = 8  # the pretend node's GPU count


@contextmanager
def pretend_gpus(n: int = GPUS):
    """Lightning sees `n` CUDA devices, so a `trainer=gpu_ddp` Trainer (devices: -1) can be
    built on a machine without GPUs (only built: nothing runs on them)."""
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pl_cuda

    with (
        mock.patch.object(fabric_cuda, "num_cuda_devices", return_value=n),
        mock.patch.object(pl_cuda.CUDAAccelerator, "is_available", staticmethod(lambda: True)),
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=n),
    ):
        yield


def trainer_from(group: str, *overrides: str):
    """The Trainer the `trainer=<group>` config builds (with the given `trainer.*` overrides)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"trainer={group}",
                "paths.output_dir=/tmp/unused",
                "trainer.enable_progress_bar=false",
                *overrides,
            ],
        )
    return instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False)


DATA = SimpleNamespace(batch_size=16)


@pytest.mark.parametrize(
    "group, overrides, world",
    [
        ("gpu_ddp", [], GPUS),  # devices: -1 -> every GPU of the node
        ("gpu_ddp", ["trainer.num_nodes=4"], 4 * GPUS),
        ("gpu_ddp", ["trainer.devices=auto"], GPUS),
        ("gpu_ddp", ["trainer.devices=[0,3]"], 2),
        ("gpu_ddp", ["trainer.devices=3", "trainer.num_nodes=2"], 6),
        ("fsdp", [], GPUS),
        ("gpu_ddp", ["trainer.accumulate_grad_batches=3"], 3 * GPUS),  # examples per optimiser step
    ],
)
def test_global_batch_from_the_trainers_world_size_gpu_configs(group, overrides, world):
    from stages.runner import global_batch_size

    with pretend_gpus():
        trainer = trainer_from(group, *overrides)
    # devices: -1 once counted as 1 device: a global batch of 16, steps x world too many
    assert global_batch_size(trainer, DATA) == 16 * world


@pytest.mark.parametrize(
    "group, overrides, world",
    [
        ("default", [], 1),
        ("default", ["trainer.devices=auto"], 1),  # CPU "auto": one process
        ("ddp_cpu", [], 2),
        ("ddp_cpu", ["trainer.num_nodes=2"], 4),
    ],
)
def test_global_batch_from_the_trainers_world_size_cpu(group, overrides, world):
    from stages.runner import global_batch_size

    trainer = trainer_from(group, *overrides)
    assert trainer.world_size == world
    assert global_batch_size(trainer, DATA) == 16 * world
    assert global_batch_size(trainer, SimpleNamespace(batch_size=16, mean_batch_size=10.5)) == round(10.5 * world)


def test_fit_window_steps_with_devices_minus_one(cache_dir, tmp_path):
    """A `fit_window` stage (resadapt) under `trainer=gpu_ddp` (devices: -1) on an 8-GPU node
    trains the steps of its window at 8 x the per-rank batch, as `devices=8` does."""
    from helpers import compose_cfg

    from stages.runner import build

    examples = 1_000_000
    common = ["stage=resadapt", f"stage.clock.examples={examples}", "logger=none", "callbacks.eval_suite=null"]
    steps = {}
    with pretend_gpus():
        for devices in ("-1", "auto", str(GPUS)):
            cfg = compose_cfg([*common, "trainer=gpu_ddp", f"trainer.devices={devices}"], cache_dir, tmp_path)
            steps[devices] = build(cfg)["trainer"].max_steps
    per_rank = int(cfg.data.batch_size)
    window = 1.0 - 0.95  # stage.clock.window of resadapt, as `Stage.window_steps` computes it
    expected = math.ceil(window * examples / (per_rank * GPUS))
    assert steps == {"-1": expected, "auto": expected, str(GPUS): expected}
    one = build(compose_cfg(common, cache_dir, tmp_path))["trainer"]  # CPU, devices: 1
    assert one.max_steps == math.ceil(window * examples / per_rank)


def test_debug_fast_without_a_logger(cache_dir, tmp_path):
    """`logger=none`: Lightning's LearningRateMonitor (which refuses a Trainer without a
    logger) is left out; the run trains and writes metrics.json."""
    import json

    from lightning.pytorch.callbacks import LearningRateMonitor
    from helpers import compose_cfg

    from stages import runner

    cfg = compose_cfg(["logger=none", "trainer.max_steps=2"], cache_dir, tmp_path)
    assert not cfg.get("logger") and cfg.callbacks.get("lr_monitor") is not None
    built = runner.build(cfg)
    assert not built["trainer"].loggers
    assert not any(isinstance(cb, LearningRateMonitor) for cb in built["trainer"].callbacks)
    import logging
    import warnings

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(handler)
    try:
        with mock.patch.object(runner, "build", return_value=built), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            runner.run(cfg)
    finally:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").removeHandler(handler)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    # the library noise that drowned the run's own lines is gone (stages/quiet.py), nothing else
    said = [str(w.message) for w in caught] + records
    for noise in ("module(s) in eval mode", "has `__len__` defined", "LeafSpec", "litlogger"):
        assert not any(noise in m for m in said), (noise, said)
    assert any("max_steps=2" in m for m in records)  # Lightning's own useful lines still show


def test_accumulation_that_does_not_divide_the_epoch_is_refused_naming_both_keys(cache_dir, tmp_path):
    """Lightning ends each epoch with a step of the leftover micro-batches (Lightning #19684):
    debug=fast's 3 batches per epoch with accumulation 2 made 6 steps from 10 micro-batches.
    Refused before anything runs; an aligned epoch trains every step on 2 micro-batches."""
    import lightning as L
    from helpers import compose_cfg, fit

    from stages.runner import build

    with pytest.raises(
        ValueError, match=r"accumulate_grad_batches=2 does not divide data.batches_per_epoch=3.*e\.g\. 4"
    ):
        build(compose_cfg(["trainer.accumulate_grad_batches=2"], cache_dir, tmp_path))
    # Lightning's limit_train_batches cuts the epoch the same way (a count or a fraction)
    for limit, epoch in (("3", 3), ("0.75", 3)):
        with pytest.raises(ValueError, match=rf"limit_train_batches={limit} \(an epoch of {epoch} batches\)"):
            build(
                compose_cfg(
                    [
                        "trainer.accumulate_grad_batches=2",
                        "data.batches_per_epoch=4",
                        f"+trainer.limit_train_batches={limit}",
                    ],
                    cache_dir,
                    tmp_path,
                )
            )

    class Count(L.Callback):
        micro = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Count.micro += 1

    trainer, _ = fit(
        compose_cfg(
            [
                "trainer.accumulate_grad_batches=2",
                "data.batches_per_epoch=4",
                "trainer.max_steps=3",
                "callbacks.model_checkpoint.every_n_train_steps=100",
            ],
            cache_dir,
            tmp_path,
        ),
        [Count()],
    )
    assert trainer.global_step == 3 and Count.micro == 6


def test_a_transformers_folder_lower_cases_as_its_own_tokenizer_does(tmp_path):
    """eval.py ckpt_path=hf:<folder> follows the folder: a Lowercase normalizer (our export of a
    lower-cased run) or SigLIP v1's SiglipTokenizer lower-case; a released Gemma tokenizer does not."""
    import json

    from stages.runner import _folder_lowercases

    cases = {
        "export": ("tokenizer.json", {"normalizer": {"type": "Sequence", "normalizers": [{"type": "Lowercase"}]}}),
        "gemma_fast": ("tokenizer.json", {"normalizer": {"type": "Replace"}}),
        "siglip_v1": ("tokenizer_config.json", {"tokenizer_class": "SiglipTokenizer"}),
        "gemma_slow": ("tokenizer_config.json", {"tokenizer_class": "GemmaTokenizer"}),
    }
    for name, (file, spec) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(json.dumps(spec))
    assert [_folder_lowercases(str(tmp_path / n)) for n in cases] == [True, False, True, False]
