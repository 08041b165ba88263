"""M4 data balancing (issue 30) end to end: the CLI on the demo's shards and a training run
that reads the table (the solver, the bounds and the loader's filter: tests/unit/test_balance.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siglip2.data.balance import load_dropped


@pytest.mark.e2e
def test_cli_on_the_demo_and_a_run_that_reads_the_table(cache_dir, tmp_path):
    """`python -m siglip2.data.balance` on the demo's shards, balancing two glyph colours
    (read from the json's objects) against the letters; then `data.balance_table=` in a short
    training run, whose metrics count the dropped samples it met."""
    from siglip2.data.balance import main
    from siglip2.data.demo import ensure_demo
    from helpers import cli

    demo = ensure_demo(str(cache_dir / "demo-n400-s0"), num_train=400, seed=0)
    config = tmp_path / "balance.yaml"
    config.write_text(
        json.dumps(
            {
                "attributes": {"red": ["red"], "blue": ["blue"]},
                "json_attributes": "objects[].color",
                "concepts": {c: [c] for c in "EHKMOSTVXZ"},
                "json_concepts": "objects[].category",
                "target": {"red": 0.7, "blue": 0.3},
                "representation_tolerance": 0.01,
                "association_tolerance": 0.01,
            }
        )
    )
    out = tmp_path / "keep.tsv"
    table = main(["--shards", str(demo.train_urls), "--config", str(config), "--out", str(out)])
    s = json.loads(Path(str(out) + ".json").read_text())
    assert s["examples"] == 400 and 0 < s["kept"] < 400
    assert abs(s["after"]["share"]["red"] - 0.7) <= 0.01 + 1e-12  # on 400 examples, whole ones: repaired
    assert s["before"]["max_association_gap"] > 0.01 >= s["after"]["max_association_gap"] - 1e-12
    dropped = load_dropped(out)
    assert len(dropped) == 400 - s["kept"] == int((~table.kept).sum())
    # a table of other shards would drop nothing: refused before training, naming both
    from stages.data import ImageTextData

    other = tmp_path / "other.tsv"
    other.write_text("key\tkeep_prob\tkept\nelsewhere/000000.tar/000000001\t0.0\t0\n")
    with pytest.raises(ValueError, match="none of which this run reads"):
        ImageTextData(
            tokenizer={"path": demo.tokenizer_path},
            image_size=64,
            batch_size=4,
            batches_per_epoch=1,
            train=demo.train_urls,
            balance_table=str(other),
        )
    proc = cli(["debug=fast", f"data.balance_table={out}", "trainer.max_steps=4"], cache_dir, tmp_path / "logs")
    metrics_path = Path(proc.stdout.strip().splitlines()[-1].split("metrics written to ")[-1])
    metrics = json.loads(metrics_path.read_text())
    assert metrics.get("data/filtered_balance", 0) > 0, {k: v for k, v in metrics.items() if k.startswith("data/")}
