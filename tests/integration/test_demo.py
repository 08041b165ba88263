"""The demo data generator: the data every fast test and the smoke run learn from.

Checked against the pixels, not against the generator's own bookkeeping: boxes against the
drawn mask, colour words against the JPEG, captions against the word tables, and the cache
against interruptions. One sample at a time, with no demo built: tests/unit/test_demo_unit.py;
concurrent callers, as processes: tests/e2e/test_demo_e2e.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter

import re

import braceexpand
import numpy as np
import pytest
import yaml
from PIL import Image

from siglip2.data import demo

SMALL = dict(
    num_train=200, num_zeroshot=50, num_retrieval=40, num_refexp=40, num_segmentation=24, num_words=20, word_share=0.2
)
TINY = dict(num_train=16, num_zeroshot=8, num_retrieval=8, num_refexp=8, num_segmentation=8, num_words=8)

# fraction of the tight box covered by the glyph's own ink, (min, max) over every letter, font
# and angle: 0.31 .. 0.73 measured on 3,029 glyphs of 2,000 scenes (seed 5), with some margin
COVERAGE = (0.25, 0.78)


def read_samples(urls) -> list[dict]:
    """Every sample of a shard pattern, read through webdataset as training does."""
    import webdataset as wds

    out = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert {"jpg", "txt", "json", "seg.png"} <= set(s), sorted(s)
        out.append(
            {
                "key": s["__key__"],
                "image": Image.open(io.BytesIO(s["jpg"])).convert("RGB"),
                "mask": np.asarray(Image.open(io.BytesIO(s["seg.png"]))),
                "txt": s["txt"].decode("utf-8"),
                "meta": json.loads(s["json"]),
            }
        )
    return out


def yaml_urls(path: str) -> tuple[dict, str]:
    with open(path) as f:
        spec = yaml.safe_load(f)
    return spec, os.path.join(os.path.dirname(path), spec["urls"])


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return demo.ensure_demo(tmp_path_factory.mktemp("demo") / "root", seed=0, workers=1, **SMALL)


@pytest.fixture(scope="module")
def train(built):
    return read_samples(built.train_urls)


@pytest.fixture(scope="module")
def evalsets(built):
    return {
        name: read_samples(yaml_urls(getattr(built, f"{name}_yaml"))[1])
        for name in ("zeroshot", "retrieval", "refexp", "segmentation", "words", "words_square")
    }


def all_samples(train, evalsets):
    return train + [s for v in evalsets.values() for s in v]


# ---------------------------------------------------------------------------------------------
def test_layout_counts_and_json_schema(built, train, evalsets):
    assert built.built and os.path.isfile(built.tokenizer_path)
    assert len(train) == SMALL["num_train"]
    assert len({s["key"] for s in train}) == len(train)
    for name, samples in evalsets.items():
        assert len(samples) == SMALL[f"num_{name.removesuffix('_square')}"], name
    for s in all_samples(train, evalsets):
        m = s["meta"]
        assert list(m)[:5] == ["lang", "width", "height", "regions", "objects"]
        assert s["image"].size == (m["width"], m["height"]) and s["mask"].shape == (m["height"], m["width"])
        assert s["mask"].dtype == np.uint8
        if "word" in m:  # a word image: its letters are the objects, one region each
            assert len(m["objects"]) == len(m["regions"]) == len(m["word"]["text"]) == 4
            assert "".join(o["category"] for o in m["objects"]) == m["word"]["text"] in demo.WORDS
            assert all(o["color"] == m["word"]["color"] and o["size"] == "" for o in m["objects"])
        else:
            assert 1 <= len(m["objects"]) == len(m["regions"]) <= max(demo._SPLITS["train"]["n_objects"])
        for r, o in zip(m["regions"], m["objects"]):
            assert set(o) == {"category", "shape", "color", "size", "font", "class_id"}
            assert o["class_id"] == demo.CATEGORIES.index(o["category"]) and o["shape"] == "letter"
            assert set(r) == {"caption", "box"} and all(0.0 <= v <= 1.0 for v in r["box"])
            x1, y1, x2, y2 = r["box"]
            assert x1 < x2 and y1 < y2


def test_eval_yamls_parse_and_resolve(built):
    for name in ("zeroshot", "retrieval", "refexp", "segmentation", "words", "words_square"):
        spec, urls = yaml_urls(getattr(built, f"{name}_yaml"))
        if name.startswith("words"):
            assert spec["task"] == "zeroshot" and spec["classnames"] == list(demo.WORDS)
            assert all("{c}" in t and "word" in t for t in spec["templates"])
            name = "zeroshot"
        assert spec["task"] == name.split("_")[0] and spec["name"] and not os.path.isabs(spec["urls"])
        files = list(braceexpand.braceexpand(urls))
        assert len(files) >= 4 and all(os.path.isfile(f) for f in files), files
    zs, _ = yaml_urls(built.zeroshot_yaml)
    assert zs["classnames"] == list(demo.CATEGORIES) and len(zs["classnames"]) == 10
    assert zs["label_key"] == "label" and all("{c}" in t for t in zs["templates"])
    seg, _ = yaml_urls(built.segmentation_yaml)
    assert seg["classnames"] == list(demo.CATEGORIES) and seg["num_classes"] == len(demo.CATEGORIES) + 1
    assert yaml_urls(built.retrieval_yaml)[0]["captions_key"] == "captions"
    assert yaml_urls(built.retrieval_yaml)[0]["lang_key"] == "lang"
    train_files = list(braceexpand.braceexpand(built.train_urls))
    assert len(train_files) == 4 and all(os.path.isfile(f) for f in train_files)


def test_boxes_are_tight_on_the_drawn_objects(train, evalsets):
    n = 0
    for s in all_samples(train, evalsets):
        m, mask = s["meta"], s["mask"]
        w, h = m["width"], m["height"]
        assert set(np.unique(mask)) - {0} == {o["class_id"] + 1 for o in m["objects"]}
        for r, o in zip(m["regions"], m["objects"]):
            bx = np.array(r["box"]) * [w, h, w, h]
            x1, y1, x2, y2 = np.round(bx).astype(int)
            assert np.abs(bx - [x1, y1, x2, y2]).max() < 0.01  # pixel edges
            win = mask[y1:y2, x1:x2]
            own = win == o["class_id"] + 1
            # nothing else drawn inside the box: objects do not overlap
            assert np.all(own | (win == 0)), (s["key"], r)
            ys, xs = np.nonzero(own)
            # the box is the object's tight mask box, within 1 px
            assert abs(xs.min()) <= 1 and abs(ys.min()) <= 1, (s["key"], r)
            assert abs(xs.max() + 1 - (x2 - x1)) <= 1 and abs(ys.max() + 1 - (y2 - y1)) <= 1, (s["key"], r)
            # ... and the ink inside it fills the box the way a bold letter does
            lo, hi = COVERAGE
            assert lo <= own.mean() <= hi, (s["key"], o, own.mean())
            n += 1
    assert n > 300


def test_colour_words_match_the_pixels(train, evalsets):
    """A glyph's ink is nearest to the pastel (60:40 with white) of its named palette colour,
    and it stands out from the background around it."""
    palette = {k: 255.0 - 0.4 * (255.0 - np.array(v, float)) for k, v in demo.COLORS.items()}
    for s in all_samples(train, evalsets):
        img, mask, m = np.asarray(s["image"], float), s["mask"], s["meta"]
        w, h = m["width"], m["height"]
        for r, o in zip(m["regions"], m["objects"]):
            x1, y1, x2, y2 = np.round(np.array(r["box"]) * [w, h, w, h]).astype(int)
            sel = np.zeros(mask.shape, bool)
            sel[y1:y2, x1:x2] = mask[y1:y2, x1:x2] == o["class_id"] + 1
            inner = sel.copy()  # drop the edge pixels JPEG blends with the background
            inner[1:] &= sel[:-1]
            inner[:-1] &= sel[1:]
            inner[:, 1:] &= sel[:, :-1]
            inner[:, :-1] &= sel[:, 1:]
            mean = img[inner if inner.any() else sel].mean(0)
            nearest = min(palette, key=lambda c: np.linalg.norm(palette[c] - mean))
            assert nearest == o["color"], (s["key"], o, mean)
            # and it stands out from the background around it
            ring = np.zeros(mask.shape, bool)
            ring[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = True
            ring &= mask == 0
            if ring.any():
                assert np.linalg.norm(img[ring].mean(0) - mean) > 60, (s["key"], o)


def _names(text: str, form: str) -> bool:
    """`form` occurs in `text` (lower-cased); a letter only as a word of its own ("k" in
    "letter k", "字母k"; not in "black")."""
    if len(form) == 1 and form.isascii():
        return re.search(rf"(?<![a-z]){re.escape(form)}(?![a-z])", text) is not None
    return form in text


def test_captions_name_every_object(train, evalsets):
    """Every caption names every glyph; eval captions and all region captions name its
    letter, the noun "letter", its colour and size. English train captions leave size and
    colour out at the split's rate; the letter is always named."""
    omitted = {"color": 0, "size": 0, "category": 0, "shape": 0}
    trials = {"color": 0, "size": 0}  # English train captions that could leave the word out
    train_keys = {id(s) for s in train}
    for s in all_samples(train, evalsets):
        m = s["meta"]
        lang = m["lang"]
        assert lang in demo.LANGS
        may_omit = id(s) in train_keys and lang == "en"
        captions = m.get("captions", [s["txt"]])
        if "word" in m:  # a word image's caption names the word, the noun "word" and its colour
            wd = m["word"]
            for cap in captions:
                low = cap.lower()
                assert wd["text"].lower() in low and any(f.lower() in low for f in demo.word_forms(lang, "word")), (
                    lang,
                    cap,
                )
                named = any(f.lower() in low for f in demo.word_forms(lang, wd["color"]))
                assert named or may_omit, (lang, cap)
                omitted["color"] += not named
                trials["color"] += may_omit  # a word has no size to leave out
        for cap in captions if "word" not in m else ():
            trials["color"] += may_omit
            trials["size"] += may_omit
            low = cap.lower()
            missing = set()
            for o in m["objects"]:
                for attr in ("category", "shape", "color", "size"):
                    forms = [f.lower() for f in demo.word_forms(lang, o[attr])]
                    if not any(_names(low, f) for f in forms):
                        missing.add(attr)
            assert not missing & {"category", "shape"}, (lang, cap, m["objects"], missing)
            assert may_omit or not missing, (lang, cap, m["objects"], missing)
            for attr in missing:
                omitted[attr] += 1
        for r, o in zip(m["regions"], m["objects"]):
            for attr in ("category", "shape", "color", "size"):
                if o[attr]:  # a word's letters have no size
                    assert any(_names(r["caption"].lower(), f.lower()) for f in demo.word_forms(lang, o[attr]))
    p = demo._SPLITS["train"]["omit_prob"]
    for attr in ("color", "size"):  # binomial(n, p): well inside 5 standard deviations
        k, n = omitted[attr], trials[attr]
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(k - n * p) < 5 * sd + 2, (attr, k, n, p)
    full = [
        s
        for s in train
        if s["meta"]["lang"] == "en"
        and "word" not in s["meta"]
        and all(f"{o['size']} {o['color']} letter {o['category']}" in s["txt"] for o in s["meta"]["objects"])
    ]
    assert full, "many English train captions keep every word"


def test_language_mix_and_tokenizer_covers_every_script(built, train, evalsets):
    langs = Counter(s["meta"]["lang"] for s in all_samples(train, evalsets))
    total = sum(langs.values())
    assert 0.82 <= langs["en"] / total <= 0.97, langs
    assert len(langs) >= 5, langs
    assert {"zh", "ja", "ru", "ar", "hi", "de", "es", "fr"} <= set(demo.LANGS)

    from siglip2.data.tokenizer import build_tokenizer

    tok = build_tokenizer(built.tokenizer_path)
    rng = np.random.default_rng(7)
    for lang in demo.LANGS:
        for _ in range(20):
            s = demo.generate_sample(rng, int(rng.integers(1, 3)), lang=lang)
            w = demo.generate_word_sample(rng, ("row", "column", "grid")[int(rng.integers(3))], lang=lang)
            for text in (
                s["captions"]
                + [r["caption"] for r in s["meta"]["regions"]]
                + w["captions"]
                + [w["meta"]["word"]["caption"]]
            ):
                ids = tok.encode(text, add_eos=False)
                pieces = [tok.sp.id_to_piece(i) for i in ids]
                assert not any(p.startswith("<0x") for p in pieces), (lang, text, pieces)  # no byte fallback
                assert tok.sp.unk_id() not in ids and tok.decode(ids) == text.lower()
    assert all(tok.sp.id_to_piece(i) != "<unk>" for i in tok.encode("12 345 499 0"))


def test_aspect_ratios_and_sizes_span_the_range(train):
    scenes = [s for s in train if "word" not in s["meta"]]
    words = [s for s in train if "word" in s["meta"]]
    share = SMALL["word_share"]  # binomial(200, share): within 5 sd
    assert abs(len(words) - len(train) * share) < 5 * (len(train) * share * (1 - share)) ** 0.5, len(words)
    ar = [s["meta"]["width"] / s["meta"]["height"] for s in scenes]
    assert min(ar) >= 0.5 - 0.01 and max(ar) <= 2.0 + 0.01
    assert min(ar) < 0.6 and max(ar) > 1.7, (min(ar), max(ar))
    short = [min(s["meta"]["width"], s["meta"]["height"]) for s in scenes]
    assert 64 <= min(short) < 80 and 145 < max(short) <= 160
    for s in words:  # rows 2:1-4:1, columns 1:2-1:4 (read along the long side), grids square
        m = s["meta"]
        ar, layout = m["width"] / m["height"], m["word"]["layout"]
        lo, hi = {"row": (2.0, 4.0), "column": (0.25, 0.5), "grid": (1.0, 1.0)}[layout]
        assert lo - 0.02 <= ar <= hi + 0.02, (layout, ar)
        boxes = [r["box"] for r in m["regions"]]
        along = 0 if layout == "row" else 1  # letters in reading order along the long side
        if layout != "grid":
            assert all(a[along + 2] <= b[along] for a, b in zip(boxes, boxes[1:])), boxes
    assert {s["meta"]["word"]["layout"] for s in words} == {"row", "column", "grid"}
    assert set(o["size"] for s in scenes for o in s["meta"]["objects"]) == set(demo.SIZES)
    # black ink on the black ground is never drawn
    assert set(o["color"] for s in train for o in s["meta"]["objects"]) == set(demo.COLORS) - {"black"}
    assert set(o["category"] for s in train for o in s["meta"]["objects"]) == set(demo.CATEGORIES)
    assert set(len(s["meta"]["objects"]) for s in scenes) == set(demo._SPLITS["train"]["n_objects"])


def test_eval_sets_carry_their_task_fields(evalsets):
    zs = evalsets["zeroshot"]
    assert all(len(s["meta"]["objects"]) == 1 for s in zs)
    assert all(s["meta"]["label"] == s["meta"]["objects"][0]["class_id"] for s in zs)
    assert set(Counter(s["meta"]["label"] for s in zs).values()) == {len(zs) // len(demo.CATEGORIES)}  # balanced
    words, square = evalsets["words"], evalsets["words_square"]
    for a, b in zip(words, square):  # the same draws, laid out along the long side vs 2 x 2
        wa, wb = a["meta"]["word"], b["meta"]["word"]
        assert a["meta"]["label"] == b["meta"]["label"] == demo.WORDS.index(wa["text"])
        assert (wa["text"], wa["color"], a["txt"]) == (wb["text"], wb["color"], b["txt"])
        assert [o["font"] for o in a["meta"]["objects"]] == [o["font"] for o in b["meta"]["objects"]]
        assert wa["layout"] in ("row", "column") and wb["layout"] == "grid"
        assert max(a["meta"]["width"], a["meta"]["height"]) >= 2 * min(a["meta"]["width"], a["meta"]["height"]) - 1
        assert b["meta"]["width"] == b["meta"]["height"]
    assert len(words) == len(square) and {s["meta"]["word"]["layout"] for s in words} == {"row", "column"}
    assert [s["meta"]["label"] for s in words] == [i % len(demo.WORDS) for i in range(len(words))]  # balanced
    for s in evalsets["retrieval"]:
        caps = s["meta"]["captions"]
        assert len(caps) == 3 and len(set(caps)) == 3 and s["txt"] == caps[0]
    assert any(s["meta"]["lang"] != "en" for s in evalsets["retrieval"])
    assert all(len(s["meta"]["regions"]) in demo._SPLITS["refexp"]["n_objects"] for s in evalsets["refexp"])
    assert min(demo._SPLITS["refexp"]["n_objects"]) >= 2  # an expression must pick one of several
    for s in evalsets["refexp"]:  # a referring expression picks out exactly one object
        caps = [r["caption"] for r in s["meta"]["regions"]]
        assert len(set(caps)) == len(caps)


def test_same_seed_same_bytes_whatever_the_worker_count(built, tmp_path):
    again = demo.ensure_demo(tmp_path / "again", seed=0, workers=2, **SMALL)
    assert again.built
    a, b = tree_digest(built.root), tree_digest(again.root)
    assert a == b  # tar headers carry a fixed mtime; JPEG quality is fixed; tokenizer single-threaded
    other = demo.ensure_demo(tmp_path / "other", seed=1, workers=1, **SMALL)
    c = tree_digest(other.root)
    assert all(a[k] != c[k] for k in a if k.endswith(".tar"))


def test_reused_not_rebuilt(built):
    before = os.stat(os.path.join(built.root, "DONE.json")).st_mtime_ns
    again = demo.ensure_demo(built.root, seed=0, workers=1, **SMALL)
    assert not again.built and again.train_urls == built.train_urls
    assert os.stat(os.path.join(built.root, "DONE.json")).st_mtime_ns == before


def test_interrupted_build_is_rebuilt_not_read(tmp_path):
    root = tmp_path / "root"
    # a killed build: shards written, no marker; plus a stale temp sibling
    (root / "train").mkdir(parents=True)
    (root / "train" / "000000.tar").write_bytes(b"half a shard")
    stale = tmp_path / "root.tmp-999-deadbeef"
    (stale / "train").mkdir(parents=True)
    d = demo.ensure_demo(root, seed=0, workers=1, **TINY)
    assert d.built and not stale.exists()
    assert len(read_samples(d.train_urls)) == TINY["num_train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "root.lock"]

    # a marker with other parameters: rebuilt for the new ones
    d2 = demo.ensure_demo(root, seed=3, workers=1, **TINY)
    assert d2.built and json.loads((root / "DONE.json").read_text())["params"]["seed"] == 3

    # a finished build that lost a shard: rebuilt
    os.remove(root / "eval" / "refexp" / "000001.tar")
    d3 = demo.ensure_demo(root, seed=3, workers=1, **TINY)
    assert d3.built and (root / "eval" / "refexp" / "000001.tar").is_file()

    # a truncated shard under a valid-looking marker: rebuilt
    with open(root / "train" / "000000.tar", "r+b") as f:
        f.truncate(100)
    assert demo.ensure_demo(root, seed=3, workers=1, **TINY).built


def test_render_grid(built, tmp_path):
    out = demo.render_grid(built.train_urls, str(tmp_path / "grid.png"), n=8, cols=4)
    img = Image.open(out)
    assert img.size == (4 * 400, 2 * 270)
    assert np.asarray(img).std() > 10


def test_command_line_builds_and_lists_every_path(tmp_path, monkeypatch, capfd):
    """`python -m siglip2.data.demo --out DIR --grid PNG` prints each path it built (the
    default eval sizes are swapped for tiny ones to keep this fast)."""
    from siglip2.data.demo import cli

    monkeypatch.setattr(cli, "_ensure", lambda root, **kw: demo.ensure_demo(root, **{**kw, **TINY, "workers": 1}))
    assert cli.main(["--out", str(tmp_path / "d"), "--num-train", "16", "--grid", str(tmp_path / "g.png")]) == 0
    out = capfd.readouterr().out  # capfd: SentencePiece writes to the stderr file descriptor
    for key in (
        "train_urls",
        "zeroshot_yaml",
        "retrieval_yaml",
        "refexp_yaml",
        "segmentation_yaml",
        "words_yaml",
        "words_square_yaml",
        "tokenizer_path",
    ):
        assert f"  {key}: " in out, out
    assert (tmp_path / "g.png").is_file()


def test_word_share_chooses_the_train_mix_and_nothing_else(tmp_path):
    """`data.demo.word_share` (ensure_demo's word_share): 1.0 makes every train image a word,
    0.0 none; the eval sets are the same bytes either way; outside [0, 1] is a ValueError."""
    only = demo.ensure_demo(tmp_path / "only", seed=0, workers=1, word_share=1.0, **TINY)
    none = demo.ensure_demo(tmp_path / "none", seed=0, workers=1, word_share=0.0, **TINY)
    assert all("word" in s["meta"] for s in read_samples(only.train_urls))
    assert not any("word" in s["meta"] for s in read_samples(none.train_urls))
    a, b = tree_digest(only.root), tree_digest(none.root)
    assert {k: v for k, v in a.items() if k.startswith("eval/")} == {
        k: v for k, v in b.items() if k.startswith("eval/")
    }
    with pytest.raises(ValueError, match="word_share"):
        demo.ensure_demo(tmp_path / "bad", workers=1, word_share=1.5, **TINY)


def test_planted_bias_sets_the_colour_ratios_and_nothing_else(tmp_path):
    """`data.demo.bias_strength` s / `bias_share` r (issue 30's miniature): among red and blue
    glyphs red is about r, and red : blue is r/(1-r) (1+s)/(1-s) = 21 in the first half of the
    alphabet, r/(1-r) (1-s)/(1+s) = 0.26 in the second (sampling noise and two-glyph scenes aside); 0 / 0.5 give the default's train bytes; the
    fairness sets hold glyphs of no attribute colour (neutral) or red / blue alternating with
    the colour in `attribute`, whatever the bias; bad values are a ValueError."""
    from siglip2.data.demo.splits import BIAS_ATTRIBUTES, BIAS_GROUPS

    sizes = dict(TINY, num_train=1500, num_bias=40)
    biased = demo.ensure_demo(tmp_path / "b", seed=0, workers=1, bias_strength=0.8, bias_share=0.7, **sizes)
    plain = demo.ensure_demo(tmp_path / "p", seed=0, workers=1, **sizes)
    default = demo.ensure_demo(tmp_path / "d", seed=0, workers=1, bias_strength=0.0, bias_share=0.5, **sizes)
    assert tree_digest(plain.root) == tree_digest(default.root)
    count = Counter()
    for s in read_samples(biased.train_urls):
        for o in s["meta"]["objects"]:
            if o["color"] in BIAS_ATTRIBUTES:
                count[(o["category"] in BIAS_GROUPS[0], o["color"])] += 1
    red = count[(True, "red")] + count[(False, "red")]
    assert abs(red / sum(count.values()) - 0.7) < 0.07
    assert 10 < count[(True, "red")] / count[(True, "blue")]
    assert 0.15 < count[(False, "red")] / count[(False, "blue")] < 0.45
    a, b = tree_digest(biased.root), tree_digest(plain.root)
    assert {k: v for k, v in a.items() if k.startswith("eval/")} == {
        k: v for k, v in b.items() if k.startswith("eval/")
    }
    neutral = read_samples(yaml_urls(biased.bias_neutral_yaml)[1])
    attributed = read_samples(yaml_urls(biased.bias_attributed_yaml)[1])
    assert len(neutral) == len(attributed) == 40
    assert not any(o["color"] in BIAS_ATTRIBUTES for s in neutral for o in s["meta"]["objects"])
    assert all(s["meta"]["objects"][0]["color"] == s["meta"]["attribute"] for s in attributed)
    pairs = Counter((s["meta"]["objects"][0]["category"], s["meta"]["attribute"]) for s in attributed)
    # every letter in both colours, equally often: the colour says nothing about the letter
    assert set(pairs) == {(c, a) for c in demo.CATEGORIES for a in BIAS_ATTRIBUTES} and set(pairs.values()) == {2}
    with pytest.raises(ValueError, match="bias_strength"):
        demo.ensure_demo(tmp_path / "bad", workers=1, bias_strength=1.0, **TINY)
