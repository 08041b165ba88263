"""Nothing lost, no silent wrong numbers (issue 18): preemption, exports, tokenizers.

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

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _start(args: list[str], cache: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "train.py", *args, f"paths.cache_dir={cache}", f"hydra.run.dir={out}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(cache_dir, tmp_path):
    """SIGTERM (preemption, a scheduler's time limit) used to exit with code 0 and save
    nothing since the last periodic checkpoint. Now: last.ckpt at the step the signal
    stopped, exit code 143, and `ckpt_path=last.ckpt` resumes from that step."""
    out = tmp_path / "run"
    proc = _start(["debug=fast", "trainer.max_steps=400", "data.batches_per_epoch=400"], cache_dir, out)
    periodic = out / "checkpoints" / "step_0000003.ckpt"
    deadline = time.time() + 300
    while not periodic.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert periodic.exists(), proc.communicate()[0][-3000:]
    time.sleep(2.0)  # a few steps past the periodic checkpoint
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, log[-3000:]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stopped = int(last["global_step"])
    assert 3 < stopped < 400, stopped  # later than the periodic checkpoint: nothing lost
    assert last["siglip2"]["examples_seen"] == stopped * 16
    # resume continues from there, to the end
    resumed = _start(["debug=fast", "trainer.max_steps=" + str(stopped + 2), "data.batches_per_epoch=400",
                      f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"], cache_dir, tmp_path / "resumed")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(final["global_step"]) == stopped + 2


def test_checkpoints_carry_their_tokenizer_and_other_ids_are_refused(cache_dir, debug_pretrain, tmp_path):
    """A `debug=fast` model evaluated with the full demo's tokenizer (same vocabulary size,
    other ids) used to get wrong numbers silently. The checkpoint now records its tokenizer
    (path, sha256); eval and export use it, a run starting from it with another tokenizer
    stops naming both, and naming another one explicitly is refused."""
    import shutil

    from siglip2.checkpoint import read_checkpoint
    from siglip2.data.tokenizer import resolve_checkpoint_tokenizer, tokenizer_fingerprint
    from stages.runner import build
    from test_train import compose_cfg

    ckpt = read_checkpoint(str(debug_pretrain / "checkpoints" / "last.ckpt"))
    record = ckpt.meta["tokenizer"]
    own = str(cache_dir / "demo-n400-s0" / "tokenizer" / "demo_sp.model")
    assert record["path"] == own and record["sha256"] == tokenizer_fingerprint(own)["sha256"]
    assert record["vocab_size"] == ckpt.model_config.text.vocab_size
    # another demo's tokenizer: the same vocabulary size, other ids
    cfg = compose_cfg(["data.demo.seed=1", f"init_from={debug_pretrain}/checkpoints/last.ckpt"], cache_dir, tmp_path)
    other = str(cfg.tokenizer.path)
    with pytest.raises(ValueError, match="was trained with the tokenizer .*demo-n400-s0.*this run's is .*demo-n400-s1"):
        build(cfg)
    from siglip2.data.tokenizer import build_tokenizer

    assert build_tokenizer(other).vocab_size == record["vocab_size"]  # the size alone could not tell them apart
    # eval / export: the configured default is ignored for the checkpoint's own ...
    assert resolve_checkpoint_tokenizer(record, other) == own
    # ... an explicitly named other one is refused by name ...
    with pytest.raises(ValueError, match="demo-n400-s1"):
        resolve_checkpoint_tokenizer(record, other, explicit=True)
    # ... and a moved copy of the right one is found by its content
    moved = tmp_path / "moved.model"
    shutil.copy(own, moved)
    gone = {**record, "path": str(tmp_path / "nowhere.model")}
    assert resolve_checkpoint_tokenizer(gone, str(moved)) == str(moved)
    with pytest.raises(ValueError, match="not there any more"):
        resolve_checkpoint_tokenizer(gone, other)


def test_final_evaluation_with_more_ranks_than_an_eval_sets_shards(cache_dir, debug_pretrain, tmp_path):
    """Two DDP ranks, every eval set cut to one shard: one rank has no images. The final
    evaluation used to die in the retrieval gather ((0, 1) vs (n, D) embeddings) after
    training, with no metrics.json. Now every set is scored on the one rank's images."""
    import json

    import yaml

    from test_train import cli

    demo = cache_dir / "demo-n400-s0" / "eval"  # built by the debug_pretrain fixture
    sets = []
    for name in ("zeroshot", "retrieval", "refexp", "segmentation"):
        spec = yaml.safe_load((demo / name / f"{name}.yaml").read_text())
        spec.update(urls=str(demo / name / "000000.tar"), name=f"{spec['name']}_1shard")
        spec.pop("num_samples", None)
        path = tmp_path / f"{name}_1shard.yaml"
        path.write_text(yaml.safe_dump(spec))
        sets.append(str(path))
    proc = cli(["debug=fast", "trainer=ddp_cpu", "trainer.max_steps=2", "eval=demo", f"eval.sets=[{','.join(sets)}]"],
               cache_dir, tmp_path / "logs")
    metrics_path = Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1])
    metrics = json.loads(metrics_path.read_text())
    one_shard = metrics["retrieval/demo_retrieval_1shard/num_images"]
    assert 0 < one_shard < 500 / 2  # one of the four shards: the other rank had none
    for key in ("zeroshot/demo_zeroshot_1shard/top1", "retrieval/demo_retrieval_1shard/image_to_text_R@5",
                "refexp/demo_refexp_1shard/acc@0.5", "segmentation/demo_segmentation_1shard/miou"):
        assert 0.0 <= metrics[key] <= 1.0, key
