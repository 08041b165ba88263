"""Dense-feature probe on a built demo's segmentation set, end to end through `evaluate_all`
with a random tiny model (its mIoU and the probe itself: tests/unit/test_dense_probe.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


# -- end to end on the demo's segmentation set ------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from siglip2.data.demo import ensure_demo

    # tiny other splits; the segmentation split keeps the demo's default size (500)
    return ensure_demo(
        tmp_path_factory.mktemp("cache") / "demo",
        num_train=16,
        seed=0,
        num_zeroshot=8,
        num_retrieval=8,
        num_refexp=8,
        num_words=8,
    )


def test_random_tiny_model_through_evaluate_all(demo):
    import yaml

    from siglip2.eval.suite import evaluate_all, load_eval_set
    from siglip2.model import build_model

    cfg = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    cfg["text"]["vocab_size"] = 100
    torch.manual_seed(0)
    model = build_model(cfg)
    es = load_eval_set(demo.segmentation_yaml)
    assert es.task == "segmentation" and len(es.segmentation_classnames) == 11  # background + 10 letters
    res = evaluate_all([es], model=model, tokenizer=None, image_size=cfg["vision"]["image_size"], batch_size=200)
    prefix = "segmentation/demo_segmentation"
    miou = res[f"{prefix}/miou"]
    assert math.isfinite(miou) and 0.0 <= miou <= 1.0, res
    assert res[f"{prefix}/num_train_images"] + res[f"{prefix}/num_test_images"] == 500
    assert 200 < res[f"{prefix}/num_train_images"] < 300
    table = res["_tables"][prefix]
    assert [row[0] for row in table] == ["background", *es.classnames]
    present = [v for _, v in table if not math.isnan(v)]
    assert miou == pytest.approx(sum(present) / len(present))
    assert model.training  # the suite restores the model's mode
