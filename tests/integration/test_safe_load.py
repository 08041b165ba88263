"""Reading a checkpoint never runs pickled code: every reader of our files (`read_checkpoint`
for eval / export / `init_from` / ACID's teacher, the teacher cache, the recipe's summaries,
a resume with `ckpt_path`) loads tensors and plain values only, and refuses a file that needs
more with a `ValueError` naming it, before anything in it runs."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch


class _WritesAFile:
    """Unpickling this calls open(marker, "w"): the file appears if pickled code runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path, **content) -> Path:
    """A file shaped like one of ours with the payload in its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {"model.w": torch.zeros(2)},
            "global_step": 3,
            "siglip2": {"stage": "pretrain", "model": {}, "note": _WritesAFile(marker)},
            **content,
        },
        path,
    )
    return path


def refused(fn, path: Path, marker: Path) -> None:
    with pytest.raises(ValueError, match="execute pickled code") as err:
        fn()
    assert str(path) in str(err.value) and "open" in str(err.value)  # the file, and what it would have run
    assert not marker.exists(), "the planted pickle ran"


def test_the_planted_file_does_run_code_when_unpickled(tmp_path):
    """The payload is live (so the tests below are not vacuous): an unrestricted load writes the file."""
    marker = tmp_path / "ran"
    path = plant(tmp_path / "live.ckpt", marker)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_read_checkpoint_refuses_pickled_code(tmp_path):
    from siglip2.checkpoint import read_checkpoint

    marker = tmp_path / "ran"
    path = plant(tmp_path / "colleague.ckpt", marker)
    refused(lambda: read_checkpoint(path), path, marker)


def test_acid_teacher_via_read_checkpoint_and_teacher_cache_refuse_pickled_code(tmp_path):
    from siglip2.acid import TeacherCache, load_teacher

    marker = tmp_path / "ran"
    teacher = plant(tmp_path / "teacher.ckpt", marker)
    refused(lambda: load_teacher(str(teacher)), teacher, marker)
    cache = tmp_path / "teacher_cache.pt"
    torch.save(
        {
            "kind": "siglip2-teacher-cache",
            "keys": ["a"],
            "image_emb": torch.zeros(1, 2),
            "text_emb": torch.zeros(1, 2),
            "logit_scale": torch.ones(()),
            "logit_bias": torch.zeros(()),
            "teacher": {"path": _WritesAFile(marker)},
            "image_size": 32,
            "text_length": 8,
        },
        cache,
    )
    refused(lambda: TeacherCache(cache), cache, marker)


def test_teacher_cache_of_plain_values_loads(tmp_path):
    from siglip2.acid import TeacherCache

    cache = tmp_path / "teacher_cache.pt"
    torch.save(
        {
            "kind": "siglip2-teacher-cache",
            "keys": ["a", "b"],
            "image_emb": torch.eye(2),
            "text_emb": torch.eye(2),
            "logit_scale": torch.ones(()),
            "logit_bias": torch.zeros(()),
            "teacher": {"path": "x.ckpt", "stage": "pretrain", "model": {"vision": {"width": 8}}},
            "image_size": 32,
            "text_length": 8,
            "tokenizer": {"sha256": "0" * 64},
        },
        cache,
    )
    got = TeacherCache(cache)
    assert got.keys == ["a", "b"] and got.lookup(["b"])[0].tolist() == [[0.0, 1.0]]


def test_recipe_summary_refuses_pickled_code(tmp_path):
    from recipe.local import ChainStage, FINISHED, stage_summary

    marker = tmp_path / "ran"
    stage = ChainStage(name="pretrain", index=0, groups={}, values=[], init_from=None, dir=tmp_path / "pretrain")
    path = plant(stage.checkpoint("last"), marker)
    (stage.dir / FINISHED).write_text(json.dumps({"zeroshot/top1": 0.5}))
    refused(lambda: stage_summary(stage), path, marker)


def test_resume_refuses_pickled_code(cache_dir, tmp_path):
    """`ckpt_path=` is checked before any strategy reads it (FSDP's full-state reader and
    DeepSpeed's engine unpickle without limits); a directory checkpoint file by file."""
    from helpers import compose_cfg

    from stages.runner import build

    marker = tmp_path / "ran"
    path = plant(tmp_path / "last.ckpt", marker)
    refused(lambda: build(compose_cfg([f"ckpt_path={path}"], cache_dir, tmp_path / "out")), path, marker)
    folder = tmp_path / "sharded.ckpt"  # the layout of a DeepSpeed checkpoint directory
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save({"w": torch.zeros(1)}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    inner = plant(folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    refused(lambda: build(compose_cfg([f"ckpt_path={folder}"], cache_dir, tmp_path / "out")), inner, marker)


def test_lightnings_own_load_is_weights_only(tmp_path):
    """`run` resumes with `trainer.fit(..., weights_only=True)`: what Lightning itself reads
    (e.g. `ckpt_path=last` or SLURM's `hpc` checkpoint, which the runner cannot see) is
    refused by torch too."""
    import pickle

    import lightning as L

    marker = tmp_path / "ran"
    path = plant(tmp_path / "hpc_ckpt_1.ckpt", marker)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(pickle.UnpicklingError):
        trainer.strategy.load_checkpoint(path, weights_only=True)
    assert not marker.exists()


def test_our_checkpoints_are_plain_and_resume_weights_only(cache_dir, debug_pretrain, tmp_path):
    """Every file a debug run writes loads with weights_only=True, and a resume through the
    runner (`python train.py ... ckpt_path=.../last.ckpt`) loads only that way."""
    from siglip2.checkpoint import load_plain, read_checkpoint
    from helpers import compose_cfg

    from stages import runner

    ckpts = sorted((debug_pretrain / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt", "frac_0.90.ckpt", "frac_0.95.ckpt"}
    for path in ckpts:
        assert load_plain(path)["siglip2"]["model"]
    assert read_checkpoint(ckpts[0]).stage == "pretrain"

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    last = debug_pretrain / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(
        [f"ckpt_path={last}", "trainer.max_steps=7", "logger=none", "callbacks.eval_suite=null"], cache_dir, tmp_path
    )
    with mock.patch.object(torch, "load", spy):
        runner.run(cfg)
    assert calls and all(w is True for w in calls), calls
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 7
