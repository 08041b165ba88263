"""DeepSpeed ZeRO-2 (conf/trainer/deepspeed_stage_2.yaml) proven on 2 CPU processes with gloo
(`trainer=deepspeed_cpu`, `stages.strategies.CPUDeepSpeedStrategy`: the same engine, flat fp32
masters split across the ranks, and checkpoint directories as on GPUs).

One `debug=fast` pretraining run per configuration (6 steps; self-distillation switches on at
step 5 of 6), shared by the tests of this module:
- fp32 DeepSpeed ends with the weights of the same command under `trainer=ddp_cpu` (student,
  teacher, LocCa decoder, distillation heads), DDP being proven equal to one process on the
  concatenated batch (tests/e2e/test_ddp_parity.py);
- the heads re-initialised at the switch reach the engine's fp32 masters and survive the step;
  the EMA teacher keeps fp32 under bf16 and follows the student by the EMA formula
  (tests/deepspeed_probe.py records both inside the run);
- resuming from a checkpoint directory gives the uninterrupted run's weights;
- the checkpoint directories are read as one checkpoint (`siglip2.checkpoint.read_checkpoint`:
  the fp32 masters, equal to DeepSpeed's own `zero_to_fp32`), by `init_from`, `eval.py` and
  `python -m siglip2.export`, without running pickled code (a directory that pickles anything
  else is refused: tests/unit/test_deepspeed_unit.py).
The first DeepSpeed run of a machine builds DeepSpeed's CPU communication op (~90 s, cached).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, cli, compose_cfg

pytestmark = pytest.mark.e2e
pytest.importorskip("deepspeed")

COMMON = ["debug=fast", "data.batch_size=8"]
DISTILL_PREFIXES = ("losses.local_to_global.", "losses.masked.")


def _train(args: list[str], cache: Path, out: Path, probe: bool = True) -> Path:
    """One `train.py` run; returns its run folder (checkpoints/, metrics.json, probe/)."""
    extra = ["+callbacks.ds_probe._target_=deepspeed_probe.SwitchProbe", f"+callbacks.ds_probe.out={out / 'probe'}"]
    cli([*COMMON, *args, *(extra if probe else [])], cache, out, timeout=900)
    (run,) = out.glob("debug/runs/*/checkpoints")
    return run.parent


def _probe(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "probe").glob("probe_rank*.json"))]


@pytest.fixture(scope="module")
def ds_run(cache_dir, module_tmp) -> tuple[Path, Path]:
    out = module_tmp("ds-fp32")
    return out, _train(["trainer=deepspeed_cpu"], cache_dir, out)


@pytest.fixture(scope="module")
def ddp_run(cache_dir, module_tmp) -> Path:
    out = module_tmp("ddp-fp32")
    return _train(["trainer=ddp_cpu"], cache_dir, out, probe=False)


@pytest.fixture(scope="module")
def ds_bf16_run(cache_dir, module_tmp) -> tuple[Path, Path]:
    out = module_tmp("ds-bf16")
    # with the end-of-training evaluation (zero-shot set), which runs an fp32 copy from the masters
    return out, _train(
        [
            "trainer=deepspeed_cpu",
            "trainer.precision=bf16-mixed",
            "eval=demo",
            "eval.max_batches=1",
            "eval.sets=[${data.demo.root}/eval/zeroshot/zeroshot.yaml]",
        ],
        cache_dir,
        out,
    )


def _state(path: Path) -> dict[str, torch.Tensor]:
    from siglip2.checkpoint import read_checkpoint

    return read_checkpoint(str(path)).state_dict


def test_checkpoint_directory_reads_as_deepspeeds_own_consolidation(ds_run):
    """`read_checkpoint` of a ZeRO-2 directory: every tensor equals what DeepSpeed's
    `get_fp32_state_dict_from_zero_checkpoint` gives (the reference), in fp32, with our meta."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from siglip2.checkpoint import read_checkpoint
    from siglip2.checkpoint_zero import read_zero_client_state

    _, run = ds_run
    for name in ("last.ckpt", "frac_0.90.ckpt"):
        path = run / "checkpoints" / name
        assert path.is_dir()  # DeepSpeed writes directories
        ckpt = read_checkpoint(str(path))
        reference = get_fp32_state_dict_from_zero_checkpoint(str(path))
        assert set(ckpt.state_dict) == set(reference)
        for key, value in reference.items():
            assert ckpt.state_dict[key].dtype == torch.float32, key
            assert torch.equal(ckpt.state_dict[key], value), key
        assert ckpt.stage == "pretrain" and ckpt.meta.loss_enabled["masked"]
        assert read_zero_client_state(path)["siglip2"] == ckpt.meta.to_dict()  # the recipe's cheap look
        assert ckpt.model("teacher") is not None and ckpt.locca_decoder() is not None


def test_fp32_deepspeed_ends_with_the_weights_of_ddp_through_the_switch(ds_run, ddp_run):
    """Same command, `trainer=deepspeed_cpu` vs `trainer=ddp_cpu`: after 6 steps (the last one with
    self-distillation) every tensor of the stage (student, EMA teacher, LocCa decoder,
    distillation heads) agrees to float rounding.

    Tolerance, from measurements on 2 cores (and a control: the same DDP run with foreach
    instead of fused AdamW, i.e. only the rounding of the update changed):
    - attention key biases: 1e-4. Their true gradient is 0 (a bias added to every key shifts
      each softmax row by a constant), so what they get is rounding noise, different for
      another order of sums (ZeRO's reduce-scatter of flat buckets vs DDP's all-reduce, foreach
      vs fused AdamW); Adam divides it by its own scale and moves them by up to ~lr per step.
      Measured: 9.1e-6 DeepSpeed vs DDP, 1.3e-5 in the DDP control.
    - everything else: 5e-6. Measured 7.0e-7 (DeepSpeed vs DDP), 1.3e-6 (control).
    Before the switch's re-initialisation went through the fp32 masters, the heads differed by
    0.14 and the teacher's heads by 5.6e-4."""
    _, ds = ds_run
    a, b = _state(ds / "checkpoints" / "last.ckpt"), _state(ddp_run / "checkpoints" / "last.ckpt")
    assert set(a) == set(b)
    worst: dict[str, float] = {}
    for key in a:
        part = (
            "key biases"
            if key.endswith("k_proj.bias")
            else next(p for p in ("teacher.", *DISTILL_PREFIXES, "losses.locca.", "model.", "") if key.startswith(p))
        )
        worst[part] = max(worst.get(part, 0.0), float((a[key].float() - b[key].float()).abs().max()))
    print("max |DeepSpeed - DDP| by part:", worst)
    assert set(worst) == {"key biases", "teacher.", "model.", "losses.locca.", *DISTILL_PREFIXES}, worst
    assert worst.pop("key biases") < 1e-4
    assert max(worst.values()) < 5e-6, worst


def test_dormant_heads_are_neither_updated_nor_decayed_before_the_switch(ds_run, cache_dir, tmp_path):
    """Before 80% the distillation heads and mask token sit in optimiser groups whose lr is 0
    (`Stage.lr_gates`): ZeRO-2's flat fp32 groups keep them exactly as built (a `grad = None`
    mask, invisible to DeepSpeed, let weight decay shrink them by ~1e-4 per step)."""
    from stages.runner import build

    _, run = ds_run
    built = build(compose_cfg([], cache_dir, tmp_path))["stage"].state_dict()
    at_step3 = _state(run / "checkpoints" / "step_0000003.ckpt")
    heads = [k for k in at_step3 if k.startswith(DISTILL_PREFIXES)]
    assert heads
    for key in heads:
        assert torch.equal(at_step3[key], built[key]), key


def test_switch_reinit_reaches_the_fp32_masters_and_survives_the_step(ds_run, ds_bf16_run):
    """The heads re-initialised at 80% are what the engine's fp32 masters hold (so the step
    continues from them), and after the step they are one lr-sized update away, not back at the
    pre-switch values (0.14 away before the fix); every rank agrees."""
    for out, dtype_tol in ((ds_run[0], 0.0), (ds_bf16_run[0], 2**-8)):
        records = _probe(out)
        assert len(records) == 2, out
        for rec in records:
            assert rec["switch_step"] == 5
            # bf16: the module holds the masters rounded to bf16 (relative 2^-9)
            assert rec["reinit_vs_master"] <= dtype_tol, rec
            assert rec["drift"] <= 3 * rec["lr"] + dtype_tol, rec
        assert records[0]["drift"] == records[1]["drift"]


def test_teacher_stays_fp32_under_bf16_and_follows_the_ema(ds_bf16_run):
    """Under bf16 DeepSpeed casts every parameter to bf16; the EMA teacher is cast back and stays
    fp32 (in the run and in the checkpoint), and the step after the switch moves it by exactly
    (1 - m) (student - teacher) — a bf16 teacher (resolution 2^-9 relative) would not move at
    all at m = 0.996."""
    out, run = ds_bf16_run
    for rec in _probe(out):
        assert rec["student_dtypes"] == ["torch.bfloat16"]
        assert rec["teacher_dtypes"] == {"start": ["torch.float32"], "end": ["torch.float32"]}
        assert rec["teacher_moved"] > 0
        assert rec["ema_residual"] <= 1e-6 * rec["teacher_scale"], rec
    ckpt = _state(run / "checkpoints" / "last.ckpt")
    assert {str(v.dtype) for k, v in ckpt.items() if k.startswith("teacher.")} == {"torch.float32"}
    # evaluation during training ran on the bf16 engine's towers through an fp32 copy (plain_model)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["zeroshot/demo_zeroshot/top1"] <= 1.0


def test_resume_from_last_ckpt_directory_gives_the_uninterrupted_weights(ds_run, cache_dir, tmp_path):
    """Resume from `last.ckpt` as a kill between steps 3 and 6 leaves it (the step-3 directory
    `ModelCheckpoint(save_last=True)` wrote then) through the switch to step 6: the same weights,
    teacher and fp32 masters as the uninterrupted run, bit for bit."""
    import shutil

    _, full = ds_run
    last = tmp_path / "killed" / "last.ckpt"
    shutil.copytree(full / "checkpoints" / "step_0000003.ckpt", last)
    resumed = _train(["trainer=deepspeed_cpu", f"ckpt_path={last}"], cache_dir, tmp_path / "resumed", probe=False)
    a, b = _state(full / "checkpoints" / "last.ckpt"), _state(resumed / "checkpoints" / "last.ckpt")
    assert set(a) == set(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert diff == 0.0, diff


def test_handoff_init_from_eval_and_export_read_the_deepspeed_checkpoint(ds_run, cache_dir, tmp_path):
    from transformers import AutoModel

    from siglip2.checkpoint import read_checkpoint
    from siglip2.export.__main__ import main as export
    from stages.runner import build

    _, run = ds_run
    handoff = run / "checkpoints" / "frac_0.95.ckpt"
    source = read_checkpoint(str(handoff))
    # init_from (a recipe hand-off): the stage starts from the consolidated fp32 weights
    stage = build(compose_cfg([f"init_from={handoff}"], cache_dir, tmp_path / "init"))["stage"]
    own = stage.state_dict()
    for key, value in source.state_dict.items():
        assert torch.equal(own[key], value), key
    # eval.py (the zero-shot set: the whole demo suite takes minutes on 2 busy cores)
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "eval=demo",
            "eval.max_batches=1",
            "eval.sets=[${data.demo.root}/eval/zeroshot/zeroshot.yaml]",
            f"paths.cache_dir={cache_dir}",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(next(tmp_path.glob("eval/runs/*/metrics.json")).read_text())
    assert 0.0 <= metrics["zeroshot/demo_zeroshot/top1"] <= 1.0
    # python -m siglip2.export: transformers loads the consolidated weights
    folder = export([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "format=hf", f"out={tmp_path / 'hf'}"])
    hf = AutoModel.from_pretrained(folder).eval()
    ours = read_checkpoint(str(run / "checkpoints" / "last.ckpt")).model()
    text = torch.randint(0, ours.config.text.vocab_size, (2, ours.config.text.max_len))
    with torch.no_grad():
        torch.testing.assert_close(
            hf.text_model(input_ids=text).pooler_output, ours.encode_text(text), atol=1e-5, rtol=1e-5
        )
