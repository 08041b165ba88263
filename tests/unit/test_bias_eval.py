"""Fairness evaluations (issue 30): representation bias and association bias
(`siglip2.eval.bias`), and the three new tasks (with `fewshot`) end to end through the eval
suite: sets written as shards + yaml, scored by a stand-in model whose numbers follow from
the construction and by a tiny random SigLIP 2 (2 gloo ranks against one process:
tests/e2e/test_bias_eval_e2e.py)."""

from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from siglip2.eval.bias import association_bias, prediction_counts, representation_bias

ROOT = Path(__file__).resolve().parents[2]


# -- the measures on count tables -------------------------------------------------------------


def test_representation_bias_hand_computed():
    res = representation_bias(torch.tensor([30, 10]))
    assert res["share"].tolist() == pytest.approx([0.75, 0.25])
    assert res["bias"] == pytest.approx(0.25) and res["num_images"] == 40
    # three values: shares 0.5, 0.3, 0.2 -> deviations from 1/3: 1/6, 1/30, 2/15 -> max 1/6
    assert representation_bias(torch.tensor([5, 3, 2]))["bias"] == pytest.approx(1 / 6)
    assert representation_bias(torch.tensor([7, 7]))["bias"] == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        representation_bias(torch.tensor([4]))
    with pytest.raises(ValueError, match="one image"):
        representation_bias(torch.tensor([0, 0]))


def test_association_bias_hand_computed():
    # rows: attribute values; columns: predicted concepts (cat, dog, car)
    counts = torch.tensor(
        [
            [6, 3, 1],  # P = .6, .3, .1
            [2, 2, 4],
        ]
    )  # P = .25, .25, .5
    res = association_bias(counts)
    assert res["gap"].tolist() == pytest.approx([0.35, 0.05, 0.4])
    assert res["bias"] == pytest.approx(0.8 / 3)
    assert res["num_images"].tolist() == [10, 8]
    # a value with no image has no P row and takes no part in the gaps
    res = association_bias(torch.tensor([[6, 3, 1], [0, 0, 0], [2, 2, 4]]))
    assert torch.isnan(res["p"][1]).all() and res["bias"] == pytest.approx(0.8 / 3)
    # predictions independent of the attribute: no bias, whatever the concepts' shares
    assert association_bias(torch.tensor([[2, 6, 2], [1, 3, 1]]))["bias"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 2 attribute values"):
        association_bias(torch.tensor([[1, 2], [0, 0]]))


def test_prediction_counts():
    pred = torch.tensor([0, 2, 2, 1, 2])
    assert prediction_counts(pred, 3).tolist() == [1, 1, 3]
    group = torch.tensor([1, 1, 0, 0, 1])
    assert prediction_counts(pred, 3, group, 2).tolist() == [[0, 1, 1], [1, 0, 2]]
    assert prediction_counts(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        prediction_counts(torch.tensor([3]), 3)


# -- eval sets written as shards, a stand-in model --------------------------------------------

IMAGE_SIZE = 16


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in rgb)).save(buf, format="PNG")
    return buf.getvalue()


def write_set(folder: Path, spec: dict, samples: list[dict], n_shards: int) -> Path:
    """`samples`: dicts with `key`, `rgb` (a uniform PNG of that colour, lossless) and `meta`
    (the json); written round-robin into `n_shards` shards beside `<folder>/set.yaml`."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    writers = [wds.TarWriter(str(folder / f"{i:06d}.tar"), encoder=False) for i in range(n_shards)]
    for i, s in enumerate(samples):
        writers[i % n_shards].write(
            {"__key__": s["key"], "png": _png(s["rgb"]), "txt": b"an image", "json": json.dumps(s["meta"]).encode()}
        )
    for w in writers:
        w.close()
    path = folder / "set.yaml"
    path.write_text(yaml.safe_dump({**spec, "urls": f"{{000000..{n_shards - 1:06d}}}.tar"}))
    return path


class TableTokenizer:
    """Each known prompt -> its row of the stand-in's text table (one token; L = 1)."""

    def __init__(self, texts):
        self.ids = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts):
        return torch.tensor([[self.ids[t]] for t in texts])


class StandIn(torch.nn.Module):
    """Image embedding = the image's mean colour (R, G, B in [0, 1]), normalised; text
    embedding = a hand-set row of `table` per prompt. The numbers of every task follow from
    the colours written and the rows set."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.float())
        self.config = SimpleNamespace(embed_dim=3)

    def encode_image(self, image):
        return SimpleNamespace(embeds=F.normalize((image.float() + 1.0).mul(0.5).mean(dim=(2, 3)), dim=-1))

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


def _unit(deg: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(math.radians(deg)), norm * math.sin(math.radians(deg)), 0.0]


# representation bias: images at angles theta_i in the red-green plane; value "man" has two
# prompts at 10 -+ 20 degrees (mean direction 10), "woman" two at 60 -+ 15 (mean 60); an
# image prefers "man" iff it is nearer 10 than 60 degrees: theta < 35.
REP_N, REP_ALPHA, REP_BETA = 36, 10.0, 60.0
REP_TEMPLATES = ["a photo of a {c}.", "a picture of a {c}."]
REP_PROMPTS = {
    "a photo of a man.": _unit(-10, 2.0),
    "a picture of a man.": _unit(30, 0.5),
    "a photo of a woman.": _unit(45, 3.0),
    "a picture of a woman.": _unit(75, 1.0),
}


def _rep_theta(i: int) -> float:
    return (i + 0.5) * 90.0 / REP_N  # 1.25 .. 88.75 degrees, 2.5 apart: none within 1.25 of 35


def _rep_samples():
    return [{"key": f"r{i:04d}", "rgb": np.round(_unit(_rep_theta(i), 200.0)), "meta": {}} for i in range(REP_N)]


# association bias: concepts cat / dog / car have text embeddings red / green / blue; an
# image's colour names its predicted concept. Per attribute value, how many images go to each
# concept:
ASSOC_CONCEPTS = ["cat", "dog", "car"]
ASSOC_TABLE = {"indoor": [6, 3, 1], "outdoor": [2, 2, 4]}
ASSOC_PROMPTS = {f"a photo of a {c}.": np.eye(3)[i].tolist() for i, c in enumerate(ASSOC_CONCEPTS)}
PURE = [(230, 10, 10), (10, 230, 10), (10, 10, 230)]


def _assoc_samples():
    samples = []
    for value, counts in ASSOC_TABLE.items():
        for concept, n in enumerate(counts):
            for j in range(n):
                samples.append({"key": f"a_{value}_{concept}_{j}", "rgb": PURE[concept], "meta": {"attribute": value}})
    samples += [{"key": f"a_garden_{j}", "rgb": PURE[0], "meta": {"attribute": "garden"}} for j in range(2)]
    samples.append({"key": "a_none", "rgb": PURE[1], "meta": {}})
    return samples


# few-shot: 3 classes, each a base colour plus per-image jitter, sometimes across the borders
FEW_BASE = np.array([[180, 60, 60], [60, 180, 60], [60, 60, 180]], dtype=np.float64)


def _few_samples(n: int = 150, jitter: float = 100.0):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        label = i % 3
        rgb = np.clip(np.round(FEW_BASE[label] + rng.uniform(-jitter, jitter, 3)), 0, 255)
        samples.append({"key": f"f{int(rng.integers(10**9)):09d}", "rgb": rgb, "meta": {"label": label}})
    samples.append({"key": "f_bad", "rgb": (1, 2, 3), "meta": {"label": 7}})  # not a class: skipped
    return samples


FEW_SPEC = {
    "name": "colours_fewshot",
    "task": "fewshot",
    "classnames": ["red", "green", "blue"],
    "shots": [1, 2, 5],
    "seeds": 3,
    "l2_reg": 0.5,
}
REP_SPEC = {
    "name": "objects_gender",
    "task": "representation_bias",
    "classnames": ["man", "woman"],
    "templates": REP_TEMPLATES,
}
ASSOC_SPEC = {
    "name": "scenes",
    "task": "association_bias",
    "classnames": ASSOC_CONCEPTS,
    "templates": ["a photo of a {c}."],
    "attribute_key": "attribute",
    "attributes": ["indoor", "outdoor"],
}


def write_sets(root: Path) -> dict[str, Path]:
    """The three sets: few-shot in 1 shard (a second rank reads none of it), representation
    bias in 3, association bias in 4."""
    return {
        "fewshot": write_set(root / "fewshot", FEW_SPEC, _few_samples(), 1),
        "rep": write_set(root / "rep", REP_SPEC, _rep_samples(), 3),
        "assoc": write_set(root / "assoc", ASSOC_SPEC, _assoc_samples(), 4),
    }


def _stand_in():
    prompts = {**REP_PROMPTS, **ASSOC_PROMPTS}
    return StandIn(torch.tensor(list(prompts.values()))), TableTokenizer(list(prompts))


def _evaluate(paths: dict[str, Path]):
    from siglip2.eval.suite import evaluate_all

    model, tok = _stand_in()
    return evaluate_all(
        [paths["fewshot"], paths["rep"], paths["assoc"]],
        model=model,
        tokenizer=tok,
        image_size=IMAGE_SIZE,
        batch_size=8,
    )


def _fewshot_reference(samples, shots, seeds, l2, num_classes=3):
    """The few-shot protocol written out again: embeddings from the written colours, the pool
    split by crc32(key) and sorted by key, numpy's draw, ridge by lstsq on the augmented system."""
    rows = sorted(
        [
            (s["key"], np.asarray(s["rgb"], dtype=np.float64) / 255.0, s["meta"]["label"])
            for s in samples
            if s["meta"]["label"] < num_classes
        ],
        key=lambda r: r[0],
    )
    keys = [r[0] for r in rows]
    x = np.stack([r[1] / np.linalg.norm(r[1]) for r in rows])
    y = np.array([r[2] for r in rows])
    train = np.array([zlib.crc32(k.encode()) / 2**32 < 0.5 for k in keys])
    px, py, tx, ty = x[train], y[train], x[~train], y[~train]
    acc = {k: [] for k in shots}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(np.where(py == c)[0]) for c in range(num_classes)]
        for k in shots:
            idx = np.concatenate([p[:k] for p in perms])
            xs, ys = px[idx], py[idx]
            mean, std = xs.mean(0), xs.std(0) + 1e-5
            aug = lambda a, mean=mean, std=std: np.hstack([(a - mean) / std, np.full((len(a), 1), 100.0)])
            target = 2.0 * np.eye(num_classes)[ys] - 1.0
            d = aug(xs).shape[1]
            w = np.linalg.lstsq(
                np.vstack([aug(xs), math.sqrt(l2) * np.eye(d)]),
                np.vstack([target, np.zeros((d, num_classes))]),
                rcond=None,
            )[0]
            acc[k].append(float(np.mean(np.argmax(aug(tx) @ w, 1) == ty)))
    return acc, int(train.sum()), int((~train).sum())


def test_the_three_tasks_through_the_suite_give_the_constructed_numbers(tmp_path):
    paths = write_sets(tmp_path)
    res = _evaluate(paths)

    # representation bias: the share of images nearer "man" (10 deg) than "woman" (60 deg)
    p = "representation_bias/objects_gender/"
    expected_man = sum(_rep_theta(i) < (REP_ALPHA + REP_BETA) / 2 for i in range(REP_N)) / REP_N
    assert expected_man == pytest.approx(14 / 36)
    assert res[p + "share/man"] == pytest.approx(expected_man, abs=1e-12)
    assert res[p + "share/woman"] == pytest.approx(1 - expected_man, abs=1e-12)
    assert res[p + "bias"] == pytest.approx(abs(expected_man - 0.5), abs=1e-12)
    assert res[p + "num_images"] == REP_N
    assert res["_tables"]["representation_bias/objects_gender"] == [
        ["man", pytest.approx(expected_man)],
        ["woman", pytest.approx(1 - expected_man)],
    ]

    # association bias: P_indoor = (.6, .3, .1), P_outdoor = (.25, .25, .5)
    p = "association_bias/scenes/"
    assert res[p + "bias"] == pytest.approx((0.35 + 0.05 + 0.4) / 3, abs=1e-12)
    assert res[p + "num_images"] == 18 and res[p + "count/indoor"] == 10 and res[p + "count/outdoor"] == 8
    # the value not listed and the image without one are counted, never silently dropped
    assert res[p + "skipped_filtered_attribute"] == 2 and res[p + "skipped_missing_attribute"] == 1
    table = dict(res["_tables"]["association_bias/scenes"])
    assert table == {"cat": pytest.approx(0.35), "dog": pytest.approx(0.05), "car": pytest.approx(0.4)}
    by_value = dict(res["_tables"]["association_bias/scenes/by_attribute"])
    assert by_value["car | outdoor"] == pytest.approx(0.5) and by_value["cat | indoor"] == pytest.approx(0.6)

    # few-shot: the protocol recomputed from the colours written
    p = "fewshot/colours_fewshot/"
    acc, n_pool, n_test = _fewshot_reference(_few_samples(), FEW_SPEC["shots"], FEW_SPEC["seeds"], FEW_SPEC["l2_reg"])
    assert res[p + "num_train_pool"] == n_pool and res[p + "num_test_images"] == n_test
    assert res[p + "num_images"] == 150 and res[p + "skipped_bad_label"] == 1
    for k in FEW_SPEC["shots"]:
        assert res[p + f"{k}shot_top1"] == pytest.approx(np.mean(acc[k]), abs=1e-4), k
        assert res[p + f"{k}shot_top1_std"] == pytest.approx(np.std(acc[k]), abs=1e-4), k
    assert 0.4 < res[p + "1shot_top1"] < res[p + "5shot_top1"] < 1.0  # neither trivial nor chance


def test_load_eval_set_validates_the_new_tasks(tmp_path):
    from siglip2.eval.suite import load_eval_set

    def load(**spec):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"name": "s", "urls": "x.tar", **spec}))
        return load_eval_set(path)

    es = load(**ASSOC_SPEC)
    assert es.attributes == ["indoor", "outdoor"] and es.attribute_key == "attribute"
    assert load(**REP_SPEC).classnames == ["man", "woman"]
    es = load(task="fewshot", classnames=["a", "b"])
    assert es.shots == [1, 5, 10] and es.seeds == 5 and es.l2_reg == 2.0**10
    bad = [
        (dict(task="representation_bias", classnames=["man"]), "at least 2"),
        (dict(task="representation_bias"), "needs classnames"),
        (dict(task="representation_bias", classnames=["a", "a"]), "repeat"),
        (dict(task="association_bias", classnames=["cat", "dog"]), "needs attributes"),
        (dict(task="association_bias", classnames=["cat", "dog"], attributes=["red"]), "at least 2 values"),
        (dict(task="association_bias", attributes=["red", "blue"]), "needs classnames"),
        (dict(task="fewshot"), "needs classnames"),
        (dict(task="fewshot", classnames=["a", "b"], shots=[0, 5]), "shots"),
        (dict(task="fewshot", classnames=["a", "b"], shots=[5, 5]), "shots"),
        (dict(task="fewshot", classnames=["a", "b"], seeds=0), "seeds"),
        (dict(task="fewshot", classnames=["a", "b"], l2_reg=-1), "l2_reg"),
        (dict(task="fewshot", classnames=["a", "b"], shot=[1]), r"'shot' \(did you mean 'shots'\?\)"),
        (dict(task="association_bias", classnames=["a", "b"], attribute=["x", "y"]), "did you mean"),
        (dict(task="fairness", classnames=["a", "b"]), "task must be one of"),
    ]
    for spec, message in bad:
        with pytest.raises(ValueError, match=message):
            load(**spec)


def test_tiny_random_siglip2_runs_the_three_sets(tmp_path):
    """The real model (conf/model/tiny.yaml shapes, random weights) through `evaluate_all`:
    every metric present and in range, the counts those of the sets written."""
    from siglip2.eval.suite import evaluate_all
    from siglip2.model import build_model

    paths = write_sets(tmp_path)
    cfg = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    cfg["text"]["vocab_size"] = 100
    torch.manual_seed(0)
    model = build_model(cfg)
    length = cfg["text"]["max_len"]

    def tokenizer(texts):  # characters -> ids, padded: a random model needs no real vocabulary
        ids = [[1 + ord(ch) % 98 for ch in t][:length] for t in texts]
        return torch.tensor([row + [0] * (length - len(row)) for row in ids])

    res = evaluate_all(
        list(paths.values()), model=model, tokenizer=tokenizer, image_size=cfg["vision"]["image_size"], batch_size=32
    )
    few, rep, assoc = "fewshot/colours_fewshot/", "representation_bias/objects_gender/", "association_bias/scenes/"
    for k in FEW_SPEC["shots"]:
        assert 0.0 <= res[few + f"{k}shot_top1"] <= 1.0 and res[few + f"{k}shot_top1_std"] >= 0.0
    assert res[few + "num_train_pool"] + res[few + "num_test_images"] == res[few + "num_images"] == 150
    assert res[rep + "share/man"] + res[rep + "share/woman"] == pytest.approx(1.0)
    assert res[rep + "bias"] == pytest.approx(abs(res[rep + "share/man"] - 0.5))
    assert res[rep + "num_images"] == REP_N
    assert 0.0 <= res[assoc + "bias"] <= 1.0 and res[assoc + "num_images"] == 18
    assert res[assoc + "skipped_filtered_attribute"] == 2
    assert model.training  # the suite restores the model's mode
