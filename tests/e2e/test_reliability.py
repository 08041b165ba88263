"""Nothing lost, no silent wrong numbers (issue 18): preemption, exports, tokenizers (in
process: tests/integration/test_reliability_integration.py; the fuzzed corpus read:
tests/unit/test_reliability_unit.py).

Each test is a case a new user hit: it failed on the code before the fix and passes after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_reliability_unit import _fuzz_corpus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _start(args: list[str], cache: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "train.py", *args, f"paths.cache_dir={cache}", f"hydra.run.dir={out}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _start_past_step_3(cache: Path, out: Path) -> subprocess.Popen:
    """A 400-step debug run, returned once its step-3 periodic checkpoint is written."""
    proc = _start(["debug=fast", "trainer.max_steps=400", "data.batches_per_epoch=400"], cache, out)
    periodic = out / "checkpoints" / "step_0000003.ckpt"
    deadline = time.time() + 300
    while not periodic.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert periodic.exists(), proc.communicate()[0][-3000:]
    return proc


def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(cache_dir, tmp_path):
    """SIGTERM (preemption, a scheduler's time limit) used to exit with code 0 and save
    nothing since the last periodic checkpoint. Now: last.ckpt at the step the signal
    stopped, exit code 143, and `ckpt_path=last.ckpt` resumes from that step."""
    out = tmp_path / "run"
    proc = _start_past_step_3(cache_dir, out)
    time.sleep(2.0)  # a few steps past the periodic checkpoint
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, log[-3000:]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stopped = int(last["global_step"])
    assert 3 < stopped < 400, stopped  # later than the periodic checkpoint: nothing lost
    assert last["siglip2"]["examples_seen"] == stopped * 16
    # resume continues from there, to the end
    resumed = _start(
        [
            "debug=fast",
            "trainer.max_steps=" + str(stopped + 2),
            "data.batches_per_epoch=400",
            f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        ],
        cache_dir,
        tmp_path / "resumed",
    )
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(final["global_step"]) == stopped + 2


def test_ctrl_c_finishes_the_step_and_saves_like_sigterm(cache_dir, tmp_path):
    """Ctrl-C (SIGINT) in a single-process run used to stop with "attempting graceful
    shutdown" and no checkpoint since the last periodic one: now the step ends, last.ckpt is
    saved at it, the log says how to resume, and the exit code is 130."""
    out = tmp_path / "run"
    proc = _start_past_step_3(cache_dir, out)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log[-3000:]
    assert "Ctrl-C: saved" in log and "interrupted by Ctrl-C" in log, log[-3000:]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 3 < int(last["global_step"]) < 400


def test_final_evaluation_with_more_ranks_than_an_eval_sets_shards(cache_dir, debug_pretrain, tmp_path):
    """Two DDP ranks, every eval set cut to one shard: one rank has no images. The final
    evaluation used to die in the retrieval gather ((0, 1) vs (n, D) embeddings) after
    training, with no metrics.json. Now every set is scored on the one rank's images."""
    import json

    import yaml

    from helpers import cli

    demo = cache_dir / "demo-n400-s0" / "eval"  # built by the debug_pretrain fixture
    sets = []
    for name in ("zeroshot", "retrieval", "refexp", "segmentation"):
        spec = yaml.safe_load((demo / name / f"{name}.yaml").read_text())
        spec.update(urls=str(demo / name / "000000.tar"), name=f"{spec['name']}_1shard")
        spec.pop("num_samples", None)
        path = tmp_path / f"{name}_1shard.yaml"
        path.write_text(yaml.safe_dump(spec))
        sets.append(str(path))
    proc = cli(
        ["debug=fast", "trainer=ddp_cpu", "trainer.max_steps=2", "eval=demo", f"eval.sets=[{','.join(sets)}]"],
        cache_dir,
        tmp_path / "logs",
    )
    metrics_path = Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1])
    metrics = json.loads(metrics_path.read_text())
    one_shard = metrics["retrieval/demo_retrieval_1shard/num_images"]
    assert 0 < one_shard < 500 / 2  # one of the four shards: the other rank had none
    for key in (
        "zeroshot/demo_zeroshot_1shard/top1",
        "retrieval/demo_retrieval_1shard/image_to_text_R@5",
        "refexp/demo_refexp_1shard/acc@0.5",
        "segmentation/demo_segmentation_1shard/miou",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_training_and_evaluation_run_to_the_end_on_the_fuzzed_corpus(cache_dir, debug_pretrain, tmp_path):
    """`debug=fast` on the fuzzed shards (and its retrieval set evaluated from them): the run
    completes, and the eval metrics report the skips by reason."""
    import json

    import yaml

    from helpers import cli

    pattern, good_keys, skips = _fuzz_corpus(tmp_path / "fuzz")
    spec = {"name": "fuzz", "task": "retrieval", "urls": pattern, "captions_key": "captions"}
    (tmp_path / "fuzz.yaml").write_text(yaml.safe_dump(spec))
    proc = cli(
        [
            "debug=fast",
            "trainer.max_steps=3",
            f"data.train='{pattern}'",
            "data.batch_size=4",
            "eval=demo",
            f"eval.sets=[{tmp_path / 'fuzz.yaml'}]",
            "data.max_pixels=10000000",
        ],
        cache_dir,
        tmp_path / "logs",
    )
    metrics = json.loads(Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1]).read_text())
    assert metrics["global_step"] == 3
    assert metrics["retrieval/fuzz/num_images"] == len(good_keys)
    for reason, n in skips.items():
        assert metrics[f"retrieval/fuzz/skipped_{reason}"] == n, reason
    assert metrics.get("data/skipped_bad_image", 0) > 0  # the training stream counted its skips too


def test_kill_9_at_a_random_moment_then_resume_ends_with_the_uninterrupted_weights(cache_dir, tmp_path):
    """A real `kill -9` (no handler runs) at a random moment of a 15-step run, after its first checkpoint;
    `ckpt_path=last.ckpt` (written atomically every 3 steps = every epoch here) resumes at an
    epoch boundary, so the final weights equal an uninterrupted run's."""
    import random

    common = [
        "debug=fast",
        "trainer.max_steps=15",
        "data.batches_per_epoch=3",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    full = _start(common, cache_dir, tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.communicate()[0][-3000:]
    killed = _start(common, cache_dir, tmp_path / "killed")  # the same run (the schedule depends on max_steps)
    # last.ckpt is written after the periodic step_*.ckpt: waiting on the latter let a kill
    # land between the two (a CI failure)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.1)
    time.sleep(random.Random().uniform(0.0, 1.0))
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    stopped = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    assert stopped % 3 == 0 and 3 <= stopped < 15
    resumed = _start([*common, f"ckpt_path={last}"], cache_dir, tmp_path / "resumed")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 15
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=1e-6, msg=key)
