"""The benchmark scripts run end to end (each in its --quick mode on an even smaller setting)
and print their ratio rows. No speed is asserted: the figures live in benchmarks/RESULTS.md."""

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
NUMBER = r"\d+(?:\.\d+)?"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_step_prints_ours_vs_open_clip_ratio_rows():
    out = run("train_step.py", "--sizes", "micro", "--repeats", "1", "--warmup", "0")
    assert "ratio ours/peer" in out
    for variant in ("sigmoid", "locca"):
        assert re.search(rf"micro\s+{variant}\s+8\s+32\s+ours\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), out


def test_data_pipeline_prints_ours_vs_decode_floor_ratio(tmp_path):
    out = run(
        "data_pipeline.py",
        "--root",
        str(tmp_path / "demo"),
        "--num-train",
        "48",
        "--eval-size",
        "1",
        "--sizes",
        "32",
        "--samples",
        "24",
        "--batch",
        "8",
        "--repeats",
        "1",
        "--web-size",
        "40x30",
        "--web-px",
        "24",
    )
    assert "ratio ours/floor" in out
    assert re.search(rf"^\s+32\s+demo\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), out
    assert re.search(rf"^\s+24\s+web 40x30\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), out


def test_mfu_prints_flops_step_time_and_mfu():
    out = run(
        "mfu.py", "--sizes", "micro", "--variants", "sigmoid", "--repeats", "1", "--warmup", "0", "--matmul", "256"
    )
    assert "MFU" in out
    assert re.search(rf"micro\s+sigmoid\s+8\s+32(\s+{NUMBER}){{4}}\s+{NUMBER}%$", out, re.M), out


def test_demo_probe_prints_ours_timm_and_cnn_accuracy_rows(tmp_path):
    out = run("demo_probe.py", "--root", str(tmp_path / "demo"), "--attribute", "category")
    assert "attribute category: 10 values" in out, out  # the letters EHKMOSTVXZ
    rows = re.findall(rf"^\s+\d+\s+\d+\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})$", out, re.M)
    assert len(rows) == 2, out
    assert all(0.0 <= float(v) <= 1.0 for row in rows for v in row), out


def test_naflex_throughput_prints_loader_and_step_ratios(tmp_path):
    out = run(
        "naflex_throughput.py",
        "--root",
        str(tmp_path / "demo"),
        "--num-train",
        "96",
        "--eval-size",
        "1",
        "--batches",
        "3",
    )
    assert re.search(rf"naflex / fixed: {NUMBER}x samples/s", out), out
    assert re.search(rf"naflex {NUMBER} ms\s+fixed {NUMBER} ms\s+ratio {NUMBER}x", out), out


def test_acid_step_prints_the_scoring_overhead():
    out = run("acid_step.py", "--steps", "1")
    assert re.search(
        rf"plain {NUMBER} ms\s+acid {NUMBER} ms\s+\(scoring \+ selection {NUMBER} ms\)\s+"
        rf"acid / plain: {NUMBER}x",
        out,
    ), out
