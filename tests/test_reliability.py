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
    resumed = _start(["debug=fast", "trainer.max_steps=" + str(stopped + 2), "data.batches_per_epoch=400",
                      f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"], cache_dir, tmp_path / "resumed")
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


def test_checkpoints_carry_their_tokenizer_and_other_ids_are_refused(cache_dir, debug_pretrain, tmp_path):
    """A `debug=fast` model evaluated with the full demo's tokenizer (same vocabulary size,
    other ids) used to get wrong numbers silently. The checkpoint now records its tokenizer
    (path, sha256); eval and export use it, a run starting from it with another tokenizer
    stops naming both, and naming another one explicitly is refused."""
    import shutil

    from siglip2.checkpoint import read_checkpoint
    from siglip2.data.tokenizer import resolve_checkpoint_tokenizer, tokenizer_fingerprint
    from stages.runner import build
    from helpers import compose_cfg

    ckpt = read_checkpoint(str(debug_pretrain / "checkpoints" / "last.ckpt"))
    record = ckpt.meta["tokenizer"]
    own = str(cache_dir / "demo-n400-s0" / "tokenizer" / "demo_sp.model")
    assert record["path"] == own and record["sha256"] == tokenizer_fingerprint(own)["sha256"]
    assert record["vocab_size"] == ckpt.model_config.text.vocab_size
    # a tokenizer of the same vocabulary size with other ids: the demo's own with two pieces
    # swapped (another demo seed's tokenizer differs in size too since format 4: 2100 vs 2104)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(own, "rb").read())
    a, b = proto.pieces[100], proto.pieces[101]
    a.piece, b.piece = b.piece, a.piece
    other = str(tmp_path / "swapped_ids.model")
    with open(other, "wb") as f:
        f.write(proto.SerializeToString())
    cfg = compose_cfg([f"tokenizer.path={other}", f"init_from={debug_pretrain}/checkpoints/last.ckpt"], cache_dir,
                      tmp_path)
    with pytest.raises(ValueError, match="was trained with the tokenizer .*demo-n400-s0.*this run's is .*swapped_ids"):
        build(cfg)
    from siglip2.data.tokenizer import build_tokenizer

    assert build_tokenizer(other).vocab_size == record["vocab_size"]  # the size alone could not tell them apart
    # eval / export: the configured default is ignored for the checkpoint's own ...
    assert resolve_checkpoint_tokenizer(record, other) == own
    # ... an explicitly named other one is refused by name ...
    with pytest.raises(ValueError, match="swapped_ids"):
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
    proc = cli(["debug=fast", "trainer=ddp_cpu", "trainer.max_steps=2", "eval=demo", f"eval.sets=[{','.join(sets)}]"],
               cache_dir, tmp_path / "logs")
    metrics_path = Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1])
    metrics = json.loads(metrics_path.read_text())
    one_shard = metrics["retrieval/demo_retrieval_1shard/num_images"]
    assert 0 < one_shard < 500 / 2  # one of the four shards: the other rank had none
    for key in ("zeroshot/demo_zeroshot_1shard/top1", "retrieval/demo_retrieval_1shard/image_to_text_R@5",
                "refexp/demo_refexp_1shard/acc@0.5", "segmentation/demo_segmentation_1shard/miou"):
        assert 0.0 <= metrics[key] <= 1.0, key


# ---------------------------------------------------------------- a fuzzed shard corpus
def _img(mode: str, fmt: str, size=(40, 30)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(mode) + len(fmt))
    if mode == "I;16":
        im = Image.fromarray((rng.integers(0, 65535, size[::-1])).astype("uint16"))
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3)).astype("uint8")).convert("P")
    else:
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3)).astype("uint8")).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _fuzz_corpus(root: Path) -> tuple[str, list[str], dict[str, int]]:
    """Shards of good and bad samples; returns (pattern, keys that must be delivered,
    skips that must be counted by reason). Samples a cut tar never held are not counted."""
    import json as _json

    from test_shards import _huge_header_jpeg, jpeg

    root.mkdir(parents=True, exist_ok=True)
    good_keys, skips = [], {}
    full = jpeg()

    def sample(key, **fields):
        return [(f"{key}.{ext}", data) for ext, data in fields.items()]

    def ok(key, image=None, ext="jpg"):
        good_keys.append(key)
        return sample(key, **{ext: image or full, "txt": f"a photo {key}".encode(),
                              "json": _json.dumps({"lang": "en"}).encode()})

    def bad(key, reason, **fields):
        skips[reason] = skips.get(reason, 0) + 1
        return sample(key, **fields)

    shard0 = (ok("a00") + ok("a01", _img("CMYK", "JPEG")) + ok("a02", _img("I;16", "PNG"), "png")
              + ok("a03", _img("P", "PNG"), "png") + ok("a04", _img("RGB", "PNG"), "jpg")  # png bytes named .jpg
              + bad("a05", "bad_image", jpg=full[: len(full) // 3], txt=b"x")
              + bad("a06", "bad_image", jpg=b"", txt=b"x")
              + bad("a07", "bad_image", jpg=b"not an image", txt=b"x")
              + bad("a08", "too_large", jpg=_huge_header_jpeg(9000, 9000), txt=b"x")
              + bad("a09", "too_large", jpg=_huge_header_jpeg(60000, 60000), txt=b"x")
              + bad("a10", "bad_caption", jpg=full, txt=b"caf\xe9 \xff")
              + bad("a11", "empty_caption", jpg=full, txt=b"  ")
              + bad("a12", "missing_caption", jpg=full, json=b"{}")
              + bad("a13", "missing_image", txt=b"caption only")
              + bad("a14", "bad_json", jpg=full, txt=b"x", json=b"{oops")
              + ok("a15"))
    _write_tar(root / "f000.tar", shard0)
    # a duplicated member: only that sample is lost
    dup = ok("b00") + ok("b01") + bad("b02", "duplicate_member", jpg=full, txt=b"x") + [("b02.jpg", full)] + ok("b03")
    _write_tar(root / "f001.tar", dup)
    # a tar cut inside the data of its last sample's image: the complete ones before it are kept
    _write_tar(root / "f002.tar", ok("c00") + ok("c01") + [("c02.txt", b"cut"), ("c02.jpg", full)])
    data = (root / "f002.tar").read_bytes()
    cut = data.rindex(full[:64]) + len(full) // 2  # inside c02.jpg's data (the last image written)
    (root / "f002.tar").write_bytes(data[:cut])
    skips["truncated_sample"] = 1
    # a zero-byte tar and a file that is not a tar at all
    (root / "f003.tar").write_bytes(b"")
    (root / "f004.tar").write_bytes(b"this is not a tar archive" * 40)
    skips["bad_shard"] = 2 + 1  # the two, and the cut one
    return str(root / "f{000..004}.tar"), good_keys, skips


def test_every_sample_of_a_fuzzed_corpus_is_delivered_or_counted(tmp_path):
    """Evaluation reads every shard once: each written sample is delivered or counted by
    reason, and the counts sum to the samples written. Before: a duplicated member lost the
    rest of its shard, a cut tar lost the complete sample before the cut, and the eval
    loader's counts of a shard's last skips never arrived (no later batch carried them)."""
    import numpy as np

    from siglip2.data.shards import SkipStats, build_eval_loader

    def sample_fn(s):
        return {"image": torch.from_numpy(np.array(s.image.resize((16, 16)), dtype=np.uint8)).permute(2, 0, 1)}

    pattern, good_keys, skips = _fuzz_corpus(tmp_path / "fuzz")
    for workers in (0, 2):
        stats, keys = SkipStats(), []
        for batch in build_eval_loader(pattern, sample_fn, batch_size=4, num_workers=workers, max_pixels=10_000_000):
            stats.update(batch)
            keys += batch.get("key", [])
        assert sorted(keys) == sorted(good_keys), workers
        assert stats.totals() == skips, workers
    written = len(good_keys) + sum(n for r, n in skips.items() if r != "bad_shard")
    assert len(keys) + sum(n for r, n in stats.totals().items() if r != "bad_shard") == written


def test_training_and_evaluation_run_to_the_end_on_the_fuzzed_corpus(cache_dir, debug_pretrain, tmp_path):
    """`debug=fast` on the fuzzed shards (and its retrieval set evaluated from them): the run
    completes, and the eval metrics report the skips by reason."""
    import json

    import yaml

    from helpers import cli

    pattern, good_keys, skips = _fuzz_corpus(tmp_path / "fuzz")
    spec = {"name": "fuzz", "task": "retrieval", "urls": pattern, "captions_key": "captions"}
    (tmp_path / "fuzz.yaml").write_text(yaml.safe_dump(spec))
    proc = cli(["debug=fast", "trainer.max_steps=3", f"data.train='{pattern}'", "data.batch_size=4",
                "eval=demo", f"eval.sets=[{tmp_path / 'fuzz.yaml'}]", "data.max_pixels=10000000"],
               cache_dir, tmp_path / "logs")
    metrics = json.loads(Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1]).read_text())
    assert metrics["global_step"] == 3
    assert metrics["retrieval/fuzz/num_images"] == len(good_keys)
    for reason, n in skips.items():
        assert metrics[f"retrieval/fuzz/skipped_{reason}"] == n, reason
    assert metrics.get("data/skipped_bad_image", 0) > 0  # the training stream counted its skips too


def test_a_tokenizer_of_another_size_than_the_model_stops_before_compute(cache_dir, debug_pretrain, tmp_path):
    """`model=b16` (256,000 tokens) with the demo's ~2,100-token tokenizer used to build and
    train until an id or a shape failed deep inside; now the run stops at start, naming both."""
    from stages.runner import build
    from helpers import compose_cfg

    from siglip2.data.tokenizer import build_tokenizer

    cfg = compose_cfg(["model.text.vocab_size=256000"], cache_dir, tmp_path)
    size = build_tokenizer(str(cfg.tokenizer.path)).vocab_size  # the demo's, ~2,100 since format 4
    with pytest.raises(ValueError, match=f"model.text.vocab_size is 256000 but the tokenizer .* has {size} tokens"):
        build(cfg)


def test_kill_9_at_a_random_moment_then_resume_ends_with_the_uninterrupted_weights(cache_dir, tmp_path):
    """A real `kill -9` (no handler runs) at a random moment of a 15-step run, after its first checkpoint;
    `ckpt_path=last.ckpt` (written atomically every 3 steps = every epoch here) resumes at an
    epoch boundary, so the final weights equal an uninterrupted run's."""
    import random

    common = ["debug=fast", "trainer.max_steps=15", "data.batches_per_epoch=3",
              "callbacks.model_checkpoint.every_n_train_steps=3"]
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


def test_init_from_a_checkpoint_missing_tower_tensors_is_refused(cache_dir, debug_pretrain, tmp_path):
    """Tensors a checkpoint lacks may start fresh only in modules a stage adds (loss heads,
    the LocCa decoder, the EMA teacher), never in the towers: such a checkpoint used to load
    with the missing tensors left random and one INFO line."""
    from stages.runner import build
    from helpers import compose_cfg

    raw = torch.load(debug_pretrain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del raw["state_dict"]["model.text_model.final_layer_norm.weight"]
    torch.save(raw, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match="lacks 1 tensors of the model itself .*final_layer_norm.weight"):
        build(compose_cfg([f"init_from={tmp_path / 'cut.ckpt'}"], cache_dir, tmp_path))
    # a checkpoint without the LocCa decoder (a stage that had none) still starts one fresh
    for key in [k for k in raw["state_dict"] if k.startswith("losses.locca.")]:
        del raw["state_dict"][key]
    raw["state_dict"]["model.text_model.final_layer_norm.weight"] = torch.ones(128)
    torch.save(raw, tmp_path / "no_locca.ckpt")
    build(compose_cfg([f"init_from={tmp_path / 'no_locca.ckpt'}"], cache_dir, tmp_path / "ok"))
