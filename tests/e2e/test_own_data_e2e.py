"""Your own shards as a user meets them: the tokenizer CLI and a `tokenizer=sentencepiece` run on
its shards, docs/own_data.md's commands run as written, and the CLIs' one-line errors (the
shards, per-batch tokenisation and caption noise: tests/unit/test_own_data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_own_data import CAPTIONS, shard_tokenizer, write_shards  # noqa: F401 (shard_tokenizer: a fixture)

ROOT = Path(__file__).resolve().parents[2]


def test_tokenizer_cli_round_trips_every_script_and_trains_on_its_shards(shard_tokenizer, tmp_path):
    """`python -m siglip2.data.tokenizer train --shards ... --vocab ... --out DIR` makes a
    model that gives back every caption (lower-cased) and `tokenizer=sentencepiece` trains
    `debug=fast` on those shards; another tokenizer's checkpoint is refused at init_from."""
    pattern, _ = shard_tokenizer
    out = tmp_path / "tok"
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "siglip2.data.tokenizer",
            "train",
            "--shards",
            pattern,
            "--vocab",
            "500",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert summary["captions"] == 60 and summary["skipped"] == {} and Path(summary["path"]) == out / "tokenizer.model"
    from siglip2.data.tokenizer import build_tokenizer

    tok = build_tokenizer(summary["path"], length=64)
    assert tok.vocab_size == summary["vocab_size"] <= 500
    for caption in CAPTIONS:
        ids = tok(caption)[0]
        assert tok.decode(ids) == caption.lower(), caption
        assert int((ids != tok.pad_id).sum()) < len(caption.encode()) + 1  # pieces, not only bytes
    assert tok.decode(tok("ünseen ✓ 字")[0]) == "ünseen ✓ 字"  # byte fallback

    run = tmp_path / "run"
    train = [
        sys.executable,
        "train.py",
        "debug=fast",
        "data=webdataset",
        f"data.train='{pattern}'",
        "data.batch_size=8",
        "data.num_workers=0",
        "tokenizer=sentencepiece",
        f"tokenizer.path={summary['path']}",
        f"hydra.run.dir={run}",
        "trainer.max_steps=3",
    ]
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and np.isfinite(metrics["train/loss"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["siglip2"]["tokenizer"]["sha256"] == summary["sha256"]
    assert ckpt["state_dict"]["model.text_model.embeddings.token_embedding.weight"].shape[0] == tok.vocab_size


def _readme_own_data_commands() -> list[str]:
    """The two commands of docs/own_data.md "Your own data" (train a tokenizer, train on the shards)."""
    text = (ROOT / "docs" / "own_data.md").read_text()
    section = text[text.index("### Your own data") :]
    section = section[: section.index("\n### ", 10)]
    lines = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("python ")]
    assert [ln.split()[:3] for ln in lines] == [
        ["python", "-m", "siglip2.data.tokenizer"],
        ["python", "train.py", "data=webdataset"],
    ], lines
    return lines


@pytest.mark.e2e
def test_readme_own_data_commands_run_as_written_then_eval_builds_no_demo(tmp_path):
    """docs/own_data.md "Your own data" run as written on tiny shards (only the shard folder, the run's
    size and the cache moved): the tokenizer CLI, then training with `data=webdataset`, whose
    evaluation defaults must not reach for the demo's sets (issue 27: an interpolation error
    before anything ran). Then `eval.py` on the user's own eval set, which must not build the
    demo (it did: ~2 min and 285 MB, silently)."""
    import shlex

    shards = write_shards(tmp_path / "data")
    cache = tmp_path / "cache"
    env = dict(os.environ, WANDB_MODE="disabled")
    small = [
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=10",
        "trainer.max_steps=2",
        "logger=none",
        f"paths.cache_dir={cache}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "hydra.run.dir=run",
    ]
    for line in _readme_own_data_commands():
        argv = [a.replace("/data/{00000..00999}.tar", shards) for a in shlex.split(line)]
        argv = [sys.executable, *argv[1:]]
        if argv[1] == "train.py":
            argv = [argv[0], str(ROOT / "train.py"), *argv[2:], *small]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (line, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "no evaluation sets" in proc.stdout + proc.stderr
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2

    # without eval.sets: the demo's sets are not silently used for a checkpoint of your own data
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt_path={ckpt}",
            f"paths.cache_dir={cache}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "was trained on your own data" in proc.stderr, proc.stderr[-3000:]
    (tmp_path / "data" / "own_retrieval.yaml").write_text(
        'name: own_retrieval\ntask: retrieval\nurls: "{00000..00001}.tar"\n'
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt_path={ckpt}",
            f"eval.sets=[{tmp_path / 'data' / 'own_retrieval.yaml'}]",
            f"paths.cache_dir={cache}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "retrieval/own_retrieval/image_to_text_R@1" in proc.stdout
    assert not any(p.name.startswith("demo") for p in cache.iterdir()) if cache.exists() else True


def test_cli_errors_are_one_clear_line_without_a_traceback(cache_dir, tmp_path):
    """A user's mistake in the tokenizer CLI and in train.py: exit code 1 and one line naming
    it, no traceback around it (issue 27); SIGLIP2_TRACEBACK=1 gives the traceback back."""
    env = dict(os.environ, WANDB_MODE="disabled")
    tok = [
        sys.executable,
        "-m",
        "siglip2.data.tokenizer",
        "train",
        "--shards",
        str(tmp_path / "no/{0..1}.tar"),
        "--vocab",
        "100",
        "--out",
        str(tmp_path / "tok"),
    ]
    proc = subprocess.run(tok, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("python -m siglip2.data.tokenizer: error: no shard matches"), proc.stderr
    proc = subprocess.run(
        tok, cwd=ROOT, env={**env, "SIGLIP2_TRACEBACK": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "siglip2.export", f"ckpt_path={tmp_path / 'nope.ckpt'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "python -m siglip2.export: error: " in proc.stderr and "nope.ckpt" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "siglip2.export", "ckpt_path=x.ckpt", "outt=/y"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # a typo: named before torch loads
    assert proc.returncode == 1 and "unknown key 'outt' (did you mean 'out'?)" in proc.stderr, proc.stderr
    expanded = [*tok[:5], str(tmp_path / "a0.tar"), str(tmp_path / "a1.tar"), *tok[6:]]  # the shell's {0..1}
    proc = subprocess.run(expanded, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "the shell expanded an unquoted {a..b} shard pattern" in proc.stderr
    train = [
        sys.executable,
        "train.py",
        "debug=fast",
        "stage.clock.lr=warm",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train.py: error: stage.clock.lr must be 'recipe' (the paper's) or 'rewarm', got 'warm'" in proc.stderr
