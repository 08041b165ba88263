"""The training entry point in process (`helpers.fit`): resume, init_from, losses that join
later, the strategies' configs (train.py runs, sweeps and DDP on 2 processes:
tests/e2e/test_train_e2e.py).

These are marked `e2e` too: each builds a tiny demo once (shared cache) and trains a tiny
model for a few steps on CPU.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from helpers import compose_cfg, fit, weights

pytestmark = pytest.mark.e2e


class _Crash(L.Callback):
    """Simulates a killed job: dies at the start of a given step, after earlier checkpoints."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SystemExit("simulated kill")


class _RecordLR(L.Callback):
    def __init__(self):
        self.first: tuple[int, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = (trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"])


def test_resume_at_epoch_boundary_matches_uninterrupted_run(cache_dir, tmp_path):
    # 3 batches per epoch, checkpoint every 3 steps: step 3 ends epoch 0.
    common = ["trainer.max_steps=6", "data.batches_per_epoch=3", "callbacks.model_checkpoint.every_n_train_steps=3"]
    full_trainer, _ = fit(compose_cfg(common, cache_dir, tmp_path / "full"))
    with pytest.raises(SystemExit):
        fit(compose_cfg(common, cache_dir, tmp_path / "killed"), [_Crash(step=4)])
    ckpt = tmp_path / "killed" / "checkpoints" / "step_0000003.ckpt"
    assert ckpt.exists()
    resumed_trainer, _ = fit(compose_cfg([*common, f"ckpt_path={ckpt}"], cache_dir, tmp_path / "resumed"))
    assert resumed_trainer.global_step == full_trainer.global_step == 6
    a = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    # Same data (loader reseeded per epoch), same optimiser state and schedule: CPU fp32
    # kernels are deterministic for a fixed thread count, so we allow only float noise.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resume_mid_epoch_continues_at_step_and_learning_rate(cache_dir, tmp_path):
    from siglip2.schedule import warmup_cosine

    common = [
        "trainer.max_steps=6",
        "data.batches_per_epoch=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
    ]
    with pytest.raises(SystemExit):
        fit(compose_cfg(common, cache_dir, tmp_path / "killed"), [_Crash(step=5)])
    ckpt = tmp_path / "killed" / "checkpoints" / "step_0000004.ckpt"  # mid epoch 1
    record = _RecordLR()
    trainer, _ = fit(compose_cfg([*common, f"ckpt_path={ckpt}"], cache_dir, tmp_path / "resumed"), [record])
    step, lr = record.first
    assert step == 4
    assert lr == pytest.approx(1e-3 * warmup_cosine(4, 6, 2, 0.0), rel=1e-6)
    assert trainer.global_step == 6


def test_resume_refuses_checkpoint_of_another_model(cache_dir, tmp_path):
    fit(compose_cfg(["trainer.max_steps=2"], cache_dir, tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"vision.width \(128 in the checkpoint, 64 here\)"):
        fit(
            compose_cfg(
                ["trainer.max_steps=4", f"ckpt_path={ckpt}", "model.vision.width=64", "model.embed_dim=64"],
                cache_dir,
                tmp_path / "b",
            )
        )


def test_resume_refuses_checkpoint_of_another_stage(cache_dir, tmp_path):
    fit(compose_cfg(["trainer.max_steps=2"], cache_dir, tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["siglip2"]["stage"] = "naflex"
    other = tmp_path / "other_stage.ckpt"
    torch.save(state, other)
    with pytest.raises(ValueError, match="from stage 'naflex'"):
        fit(compose_cfg(["trainer.max_steps=4", f"ckpt_path={other}"], cache_dir, tmp_path / "b"))


def test_init_from_loads_weights_and_names_mismatched_tensors(cache_dir, tmp_path):
    fit(compose_cfg(["trainer.max_steps=2"], cache_dir, tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    trainer, stage = fit(
        compose_cfg(["trainer.max_steps=1", f"init_from={ckpt}", "optim.lr=0"], cache_dir, tmp_path / "b")
    )
    src = weights(ckpt)
    for key, value in stage.state_dict().items():
        torch.testing.assert_close(value, src[key], msg=key)  # lr 0: weights stay as loaded
    from stages.runner import build

    with pytest.raises(ValueError, match=r"text.max_len \(40 in the init_from=.*, 32 here\)"):
        build(compose_cfg([f"init_from={ckpt}", "model.text.max_len=32"], cache_dir, tmp_path / "c"))
    with pytest.raises(
        ValueError, match=r"vision.depth \(4 in the init_from=.*, 2 here\)"
    ):  # not a silent partial load
        build(compose_cfg([f"init_from={ckpt}", "model.vision.depth=2"], cache_dir, tmp_path / "d"))


def test_deepspeed_stage_2_composes_and_builds_trainer_on_cpu(cache_dir, tmp_path):
    """Training needs CUDA; on CPU the config composes and Lightning builds the Trainer."""
    from stages.runner import build

    cfg = compose_cfg(
        ["trainer=deepspeed_stage_2", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"],
        cache_dir,
        tmp_path,
    )
    strategy = build(cfg)["trainer"].strategy
    assert type(strategy).__name__ == "DeepSpeedStrategy"
    assert strategy.config["zero_optimization"]["stage"] == 2


def test_fsdp_composes_and_wraps_transformer_blocks(cache_dir, tmp_path):
    """Lightning refuses FSDP without a GPU, so on CPU we build the strategy from the config
    and check it, and check that the Trainer's refusal is the GPU one (not a config error)."""
    from hydra.utils import instantiate

    from siglip2.model.decoder import DecoderLayer
    from siglip2.model.layers import EncoderLayer
    from stages.runner import build

    cfg = compose_cfg(["trainer=fsdp"], cache_dir, tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert {EncoderLayer, DecoderLayer} <= set(strategy.kwargs["auto_wrap_policy"]._module_classes)
    with pytest.raises(Exception, match="requires a GPU accelerator"):
        build(
            compose_cfg(
                ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"],
                cache_dir,
                tmp_path,
            )
        )


# ---------------------------------------------------------------- losses that join later
class _Watch(L.Callback):
    """At each batch start (after LossSchedule): which losses are on, and the optimiser state
    of the probe head (cleared at the switch)."""

    def __init__(self):
        self.on: dict[int, bool] = {}
        self.state_at_switch: list[int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on[trainer.global_step] = pl_module.loss_enabled["probe"]
        if pl_module.switches and pl_module.switches[-1][1] == trainer.global_step and self.state_at_switch is None:
            opt = trainer.optimizers[0]
            self.state_at_switch = [len(opt.state.get(p, {})) for p in pl_module.losses["probe"].parameters()]


PROBE = [
    "stage._target_=probe_stage.ProbeStage",
    "+stage.losses.probe.start_frac=0.5",
    "trainer.max_steps=9",
    "~stage.losses.local_to_global",
    "~stage.losses.masked",  # only the probe joins later here
    "data.batches_per_epoch=3",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]


def test_a_loss_joins_at_its_fraction_once_and_resume_keeps_the_phase(cache_dir, tmp_path):
    """The probe loss (tests/probe_stage.py) is built with the stage, so the optimiser and the
    checkpoints hold its parameters from step 0; it turns on at 50% (step 5 of 9) with its
    parameters re-initialised and its optimiser state cleared, the hook firing once. Runs
    resumed from a checkpoint before the switch (step 3: the switch happens again after the
    resume, as in the killed run) and after it (step 6) end in the same phase with the same
    weights as the uninterrupted run."""
    watch = _Watch()
    _, full = fit(compose_cfg(PROBE, cache_dir, tmp_path / "full"), [watch])
    assert full.switches == [("probe", 5)]
    assert watch.on == {s: s >= 5 for s in range(9)}
    assert watch.state_at_switch is not None and set(watch.state_at_switch) == {0}
    ref = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("losses.probe.head.") for k in ref)

    with pytest.raises(SystemExit):
        fit(compose_cfg(PROBE, cache_dir, tmp_path / "killed"), [_Crash(step=7)])
    for step, fires in ((3, [("probe", 5)]), (6, [])):
        ckpt = tmp_path / "killed" / "checkpoints" / f"step_{step:07d}.ckpt"
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)["siglip2"]
        assert meta["loss_enabled"]["probe"] == (step > 5)
        watch = _Watch()
        trainer, resumed = fit(
            compose_cfg([*PROBE, f"ckpt_path={ckpt}"], cache_dir, tmp_path / f"resumed{step}"), [watch]
        )
        assert resumed.switches == fires
        assert watch.on == {s: s >= 5 for s in range(step, 9)}
        got = weights(tmp_path / f"resumed{step}" / "checkpoints" / "last.ckpt")
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=f"resumed from {step}: {key}")


def test_a_misspelt_loss_key_fails_before_training(cache_dir, tmp_path):
    from stages.runner import build

    # Hydra wraps the stage's ValueError in an InstantiationException carrying its message.
    with pytest.raises(Exception, match=r"stage\.losses\.locca\.paralel_prob.*parallel_prob"):
        build(compose_cfg(["+stage.losses.locca.paralel_prob=0.1"], cache_dir, tmp_path))


DISTILL = [
    "stage.losses.local_to_global.start_frac=0.5",
    "stage.losses.masked.start_frac=0.5",
    "trainer.max_steps=9",
    "data.batches_per_epoch=3",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]


def test_distillation_switches_on_and_resumes_with_the_same_teacher(cache_dir, tmp_path):
    """Self-distillation and masked prediction at 50% (step 5 of 9): the teacher starts as the
    student and follows it by EMA; resumed before and after the switch, the run ends with
    the uninterrupted run's student, heads, centres and teacher."""
    _, full = fit(compose_cfg(DISTILL, cache_dir, tmp_path / "full"))
    ref = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert full.loss_enabled["local_to_global"] and full.loss_enabled["masked"]
    teacher = {k[len("teacher.vision.") :]: v for k, v in ref.items() if k.startswith("teacher.vision.")}
    student = {k[len("model.vision_model.") :]: v for k, v in ref.items() if k.startswith("model.vision_model.")}
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # EMA lags the student
    assert ref["losses.local_to_global.target.center"].abs().sum() > 0
    with pytest.raises(SystemExit):
        fit(compose_cfg(DISTILL, cache_dir, tmp_path / "killed"), [_Crash(step=7)])
    for step in (3, 6):
        ckpt = tmp_path / "killed" / "checkpoints" / f"step_{step:07d}.ckpt"
        fit(compose_cfg([*DISTILL, f"ckpt_path={ckpt}"], cache_dir, tmp_path / f"resumed{step}"))
        got = weights(tmp_path / f"resumed{step}" / "checkpoints" / "last.ckpt")
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=f"resumed from {step}: {key}")


def test_last_ckpt_holds_the_final_weights_whatever_the_interval(cache_dir, tmp_path):
    """max_steps 7 with a checkpoint every 3 steps: last.ckpt must be step 7, not 6."""
    _, stage = fit(compose_cfg(["trainer.max_steps=7"], cache_dir, tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 7
    for key, value in stage.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_a_run_shorter_than_the_interval_writes_one_last_ckpt(cache_dir, tmp_path):
    """2 steps, checkpoints every 3: ModelCheckpoint never saved at its interval, and must not
    save the same final step again as last-v1.ckpt beside the final last.ckpt (issue 27)."""
    fit(compose_cfg(["trainer.max_steps=2"], cache_dir, tmp_path))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["frac_0.90.ckpt", "frac_0.95.ckpt", "last.ckpt"], names
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


def test_resuming_a_finished_run_says_so(debug_pretrain, cache_dir, tmp_path, caplog):
    """`ckpt_path=<last.ckpt>` of a run that reached trainer.max_steps trains nothing: the
    run says so instead of ending quietly as if it had trained."""
    import logging

    from stages.runner import build

    last = debug_pretrain / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.WARNING, logger="stages.runner"):
        build(compose_cfg([f"ckpt_path={last}"], cache_dir, tmp_path / "again"))
    assert "is at step 6 and this run stops at trainer.max_steps=6: it is already finished" in caplog.text
    caplog.clear()
    # training on past the end re-times the recipe: said, with the progress before and after
    with caplog.at_level(logging.WARNING):
        trainer, _ = fit(compose_cfg([f"ckpt_path={last}", "trainer.max_steps=8"], cache_dir, tmp_path / "on"))
    assert trainer.global_step == 8 and "already finished" not in caplog.text
    assert "the checkpoint's recipe is 96 examples long and this run's is 128" in caplog.text
    assert "from 100.0% to 75.0%" in caplog.text
