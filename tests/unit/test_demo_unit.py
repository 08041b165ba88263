"""The demo data generator, one sample at a time (no demo built): the letter is not decidable
from the mean colour, English relations follow the boxes, glyph scenes label and box each
glyph's ink, word layouts, and the clear errors (the built demo, checked against its pixels:
tests/integration/test_demo.py)."""

from __future__ import annotations

import numpy as np
import pytest

from siglip2.data import demo
from test_demo import TINY


def test_category_is_not_decidable_from_mean_colour():
    """A classifier of the image's mean colour (Gaussian per category, fit on 1600 images,
    tested on 800 more) stays far below what a model must reach (the demo's bar is 0.80):
    the letter has to be seen in the glyph. Letters differ in how much ink they take (M vs T),
    so the bar is twice chance, not chance."""
    rng = np.random.default_rng(11)
    k = len(demo.CATEGORIES)

    def draw(n):
        x, y = [], []
        for _ in range(n):
            s = demo.generate_sample(rng, int(rng.integers(1, 3)), lang="en")
            x.append(np.asarray(s["image"], float).reshape(-1, 3).mean(0))
            y.append(demo.CATEGORIES.index(s["meta"]["objects"][0]["category"]))
        return np.array(x), np.array(y)

    x_fit, y_fit = draw(1600)
    x_test, y_test = draw(800)
    scores = []
    for c in range(k):  # quadratic discriminant analysis by hand
        mu, cov = x_fit[y_fit == c].mean(0), np.cov(x_fit[y_fit == c].T) + 1e-3 * np.eye(3)
        d = x_test - mu
        scores.append(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) - 0.5 * np.linalg.slogdet(cov)[1])
    acc = float((np.argmax(scores, 0) == y_test).mean())
    assert acc < 2 / k, acc


def test_english_relations_follow_the_boxes():
    """'A left of B' in an English caption must hold for the drawn boxes."""
    rng = np.random.default_rng(123)
    checked = 0
    for _ in range(60):
        s = demo.generate_sample(rng, 2, lang="en")
        cap, m = s["captions"][0], s["meta"]
        names = [r["caption"] for r in m["regions"]]
        boxes = [np.array(r["box"]) * ([m["width"], m["height"]] * 2) for r in m["regions"]]
        centre = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
        for a, b in ((0, 1), (1, 0)):
            for word, ok in (
                ("left of", centre[a][0] < centre[b][0]),
                ("right of", centre[a][0] > centre[b][0]),
                ("above", centre[a][1] < centre[b][1]),
                ("below", centre[a][1] > centre[b][1]),
                ("under", centre[a][1] > centre[b][1]),
            ):
                if f"{names[a]} {word} a {names[b]}" in cap or f"{names[a]} to the {word} a {names[b]}" in cap:
                    assert ok, (cap, centre)
                    checked += 1
    assert checked == 60


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError):
        demo.ensure_demo(root, workers=1, **TINY)
    assert (root / "thesis.tex").read_text() == "precious"


def test_glyph_scenes_label_each_glyphs_ink_and_box_it_tightly():
    """The glyph world (issue 28): each glyph's ink carries its class in the mask,
    and its box is the tight box of that ink; the same seed draws the same scene."""
    import numpy as np

    from siglip2.data.demo.glyphs import GLYPHS, draw_glyph_scene

    for seed in range(6):
        img, mask, glyphs = draw_glyph_scene(np.random.default_rng(seed), 120, 80, 3)
        again = draw_glyph_scene(np.random.default_rng(seed), 120, 80, 3)
        assert np.array_equal(np.asarray(img), np.asarray(again[0])) and np.array_equal(mask, again[1])
        assert glyphs and img.size == (120, 80) and mask.shape == (80, 120)
        assert len({g.color for g in glyphs}) == len(glyphs)
        for g in glyphs:
            x1, y1, x2, y2 = g.box
            ys, xs = np.nonzero(mask == GLYPHS.index(g.glyph) + 1)
            inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
            assert inside.any()
            own_y, own_x = ys[inside], xs[inside]
            assert (own_x.min(), own_y.min(), own_x.max() + 1, own_y.max() + 1) == g.box


def test_glyph_scene_options_the_probe_compares():
    """The options `benchmarks/demo_probe.py --world glyphs` compares (issue 28): another
    alphabet labels each glyph by its place in that alphabet; a black background with pastel
    ink keeps every ink pixel bright (each channel >= 0.6 * 255 by the 60:40 white mix) over a
    black ground; white ink is white; blocky glyphs are made of whole `height / cells` blocks."""
    import numpy as np

    from siglip2.data.demo.glyphs import draw_glyph_scene

    letters = "AEHKLOTVXZ"
    for seed in range(4):
        img, mask, glyphs = draw_glyph_scene(
            np.random.default_rng(seed),
            96,
            96,
            2,
            None,
            ("large", "medium"),
            background="black",
            ink="pastel",
            alphabet=letters,
        )
        a = np.asarray(img).astype(int)
        assert glyphs and all(g.glyph in letters for g in glyphs)
        assert set(np.unique(mask)) == {0} | {letters.index(g.glyph) + 1 for g in glyphs}
        assert a[mask > 0].min() >= 153 and a[mask == 0].max() <= 12  # JPEG is not involved: exact
    img, mask, _ = draw_glyph_scene(
        np.random.default_rng(0), 80, 80, 1, "7", ("large",), background="black", ink="white", centred=True
    )
    assert (np.asarray(img)[mask > 0] == 255).all()
    _, mask, (g,) = draw_glyph_scene(np.random.default_rng(0), 96, 96, 1, "4", ("large",), cells=7, background="flat")
    x1, y1, x2, y2 = g.box
    ink = mask[y1:y2, x1:x2] > 0
    k = round(ink.shape[0] / 7)
    assert ink.shape[0] % k == 0 and ink.shape[1] % k == 0
    assert (ink == np.kron(ink[::k, ::k], np.ones((k, k), bool))).all()


def test_more_glyphs_than_fit_is_a_clear_error_not_a_hang():
    """Two glyphs (the demo's most) fit; six never do: a ValueError, not a loop."""
    rng = np.random.default_rng(0)
    assert len(demo.generate_sample(rng, 2, lang="en")["meta"]["objects"]) == 2
    with pytest.raises(ValueError, match="did not fit"):
        demo.generate_sample(rng, 6, lang="en")


def test_word_layouts_draw_the_same_word_and_read_along_the_long_side():
    """Issue 28's elongated images: from one generator state, every layout draws the same word,
    colour, font and letters (each letter's ink the same size); a row reads left to right and a column top to bottom, each
    letter inside its quarter of the long side; the grid is 2 x 2, read row by row; each letter's
    ink carries its class in the mask. Words and layouts outside the demo's are a ValueError."""
    from siglip2.data.demo.glyphs import LETTERS

    for seed in range(8):
        drawn = {
            lay: demo.generate_word_sample(np.random.default_rng(seed), lay, lang="en")
            for lay in ("row", "column", "grid")
        }
        words = {
            lay: (
                s["meta"]["word"]["text"],
                s["meta"]["word"]["color"],
                s["captions"][0],
                tuple(o["font"] for o in s["meta"]["objects"]),
            )
            for lay, s in drawn.items()
        }
        assert len(set(words.values())) == 1, words
        # the same letters, pixel for pixel: each letter's ink box has one size in every layout
        sizes = {
            lay: [
                (
                    round((r["box"][2] - r["box"][0]) * s["meta"]["width"]),
                    round((r["box"][3] - r["box"][1]) * s["meta"]["height"]),
                )
                for r in s["meta"]["regions"]
            ]
            for lay, s in drawn.items()
        }
        assert sizes["row"] == sizes["column"] == sizes["grid"], sizes
        for lay, s in drawn.items():
            m, mask = s["meta"], s["mask"]
            w, h = m["width"], m["height"]
            boxes = [np.array(r["box"]) * [w, h, w, h] for r in m["regions"]]
            centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
            if lay == "grid":
                assert w == h
                cells = [(int(cx >= w / 2), int(cy >= h / 2)) for cx, cy in centres]
                assert cells == [(0, 0), (1, 0), (0, 1), (1, 1)], cells
            else:
                long, along = (w, 0) if lay == "row" else (h, 1)
                assert 2.0 - 0.02 <= long / min(w, h) <= 4.0 + 0.02
                quarters = [int(c[along] // (long / 4)) for c in centres]
                assert quarters == [0, 1, 2, 3], (lay, quarters)
            for o, b in zip(m["objects"], boxes):
                x1, y1, x2, y2 = np.round(b).astype(int)
                assert (mask[y1:y2, x1:x2] == LETTERS.index(o["category"]) + 1).any()
            assert set(np.unique(mask)) - {0} == {LETTERS.index(c) + 1 for c in m["word"]["text"]}
    with pytest.raises(ValueError, match="force takes"):
        demo.generate_word_sample(np.random.default_rng(0), "row", force={"word": "CAT"})
    with pytest.raises(ValueError, match="layout"):
        demo.generate_word_sample(np.random.default_rng(0), "diagonal")
