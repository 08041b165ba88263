"""M4 data balancing (issue 30, `siglip2.data.balance`): the QP's solution against an
independent solver and its own dual bound, the kept set's moments against the bounds, the
largest keep any per-pattern rule could reach (an LP), determinism by seed, the indicators,
and the loader's filter counting every sample it drops (the CLI on the demo's shards and a
training run that reads the table: tests/e2e/test_balance_e2e.py)."""

from __future__ import annotations

import numpy as np
import pytest

from siglip2.data.balance import (
    BalanceConfig,
    Indicators,
    balance,
    constraint_features,
    load_dropped,
    moments,
    solve,
    table_key,
)

GENDER = {"man": ["man", "men", "homme", "hombre", "男"], "woman": ["woman", "women", "femme", "mujer", "女"]}
JOBS = {"doctor": ["doctor", "médecin"], "nurse": ["nurse", "infirmière"], "pilot": ["pilot"]}


def _biased_captions(n: int, seed: int = 0) -> list[tuple[str, str, None]]:
    """Captions where men are 61% of those with a gender word, and doctors / pilots mostly men."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        job = rng.choice(["doctor", "nurse", "pilot", ""])
        p_man = {"doctor": 0.8, "nurse": 0.15, "pilot": 0.9, "": 0.6}[job]
        g = rng.choice(["man", "woman", ""], p=[p_man * 0.7, (1 - p_man) * 0.7, 0.3])
        out.append((f"shard/{i:06d}", " ".join(w for w in ("a photo of a", g, job) if w), None))
    return out


def _problem(examples, cfg):
    ind = Indicators(cfg)
    index: dict = {}
    for _, c, m in examples:
        s, y = ind(c, m)
        index[s + y] = index.get(s + y, 0) + 1
    return np.array(list(index)), np.array(list(index.values()), dtype=np.float64)


@pytest.mark.parametrize("keep_rate", [1.0, 0.6])
def test_the_dual_solution_is_the_qp_optimum(keep_rate):
    """Against scipy's SLSQP on the same QP (an independent solver) and against weak duality:
    the primal objective at our q equals the dual function at our lambda (gap ~ 0), so no keep
    rule meeting the bounds is closer to the keep rate."""
    from scipy.optimize import minimize

    cfg = BalanceConfig(attributes=GENDER, concepts=JOBS, keep_rate=keep_rate)
    patterns, counts = _problem(_biased_captions(4000), cfg)
    sol = solve(patterns, counts, cfg)
    w = counts / counts.sum()
    B = constraint_features(patterns, cfg)
    assert sol.max_violation <= 1e-6

    def objective(q):
        return 0.5 * float(w @ (q - keep_rate) ** 2)

    ref = minimize(
        objective,
        np.full(len(w), 0.5),
        jac=lambda q: w * (q - keep_rate),
        method="SLSQP",
        bounds=[(0, 1)] * len(w),
        constraints=[{"type": "ineq", "fun": lambda q: -(B * w[:, None]).T @ q, "jac": lambda q: -(B * w[:, None]).T}],
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    assert ref.success, ref.message
    assert abs(objective(sol.keep) - ref.fun) <= 1e-7
    np.testing.assert_allclose(sol.keep, ref.x, atol=2e-3)
    dual = float(w @ (0.5 * (sol.keep - keep_rate) ** 2 + sol.keep * (B @ sol.dual)))
    assert objective(sol.keep) - dual <= 1e-7  # duality gap: the dual bounds the primal from below


def test_the_kept_set_meets_the_bounds_and_the_biased_one_did_not():
    cfg = BalanceConfig(attributes=GENDER, concepts=JOBS, representation_tolerance=0.02, association_tolerance=0.01)
    table = balance(_biased_captions(6000), cfg, seed=0)
    s = table.summary
    before, after = s["before"], s["after"]
    assert before["max_representation_gap"] > 0.1 and before["max_association_gap"] > 0.05
    # whole examples per pattern, rounded then repaired: the bounds hold on the kept counts
    assert after["max_representation_gap"] <= 0.02 + 1e-12
    assert after["max_association_gap"] <= 0.01 + 1e-12
    # moments recomputed from the kept rows themselves, not from the solver's counts
    kept = [e for e, k in zip(_biased_captions(6000), table.kept) if k]
    patterns, counts = _problem(kept, cfg)
    again = moments(patterns, counts, cfg)
    assert again["share"] == pytest.approx(after["share"]) and again["examples"] == s["kept"]
    # unattributed examples are all kept (no bound sees them)
    plain = [k for (key, c, _), k in zip(_biased_captions(6000), table.kept) if "man" not in c]
    assert all(plain)
    # the largest keep any per-pattern rule meeting the bounds reaches bounds ours from above
    assert s["kept_fraction"] <= s["max_keep_bound"] + 1e-3 and s["kept_fraction"] >= 0.95 * s["max_keep_bound"]


def test_max_keep_bound_is_the_brute_force_optimum_on_a_small_case():
    """Every keep count per pattern enumerated (the integer problem) on 3 patterns: the best
    keep that meets the bounds is at most the LP bound, and the LP is tight to rounding."""
    from itertools import product

    from siglip2.data.balance import max_keep_bound

    cfg = BalanceConfig(attributes={"a": ["a"], "b": ["b"]}, representation_tolerance=0.0)
    patterns = np.array([[1, 0], [0, 1], [0, 0]])
    counts = np.array([9.0, 3.0, 4.0])
    best = 0
    for k in product(*(range(int(n) + 1) for n in counts)):
        kept = np.array(k, dtype=np.float64)
        m = moments(patterns, kept, cfg)
        if m["attributed"] == 0 or m["max_representation_gap"] <= 1e-12:
            best = max(best, int(kept.sum()))
    assert best == 3 + 3 + 4  # 3 a's and 3 b's, every unattributed example
    assert max_keep_bound(patterns, counts, cfg) == pytest.approx(best / counts.sum())
    sol = solve(patterns, counts, cfg)
    assert np.rint(sol.keep * counts).sum() == best  # M4 reaches it here


def test_deterministic_by_seed():
    cfg = BalanceConfig(attributes=GENDER, concepts=JOBS)
    ex = _biased_captions(3000)
    a, b, c = balance(ex, cfg, seed=0), balance(ex, cfg, seed=0), balance(ex, cfg, seed=1)
    assert np.array_equal(a.kept, b.kept)
    assert not np.array_equal(a.kept, c.kept) and a.kept.sum() == c.kept.sum()  # same counts, other keys


def test_indicators_words_scripts_and_json():
    cfg = BalanceConfig(attributes=GENDER, concepts=JOBS, json_attributes="objects[].gender")
    ind = Indicators(cfg)
    assert ind("A Man and a manager", None) == ((1, 0), (0, 0, 0))  # whole words, any case
    assert ind("une femme médecin", None) == ((0, 1), (1, 0, 0))  # the config's other languages
    assert ind("一个男人", None)[0] == (1, 0)  # no word boundaries in CJK: substring
    thai = Indicators(BalanceConfig(attributes={"man": ["ผู้ชาย"], "woman": ["ผู้หญิง"]}))
    assert thai("รูปผู้ชายคนหนึ่ง", None)[0] == (1, 0)  # nor in Thai
    # the json path wins when present (here: nobody in the json, whatever the caption says)
    assert ind("a man", {"objects": [{"gender": "woman"}]})[0] == (0, 1)
    assert ind("a man", {"objects": []})[0] == (0, 0)  # the path is there and holds nobody: still the json
    assert ind("a man", {"people": []})[0] == (1, 0)  # the path is absent from this json: the caption


def test_clear_errors():
    with pytest.raises(ValueError, match="at least two values"):
        BalanceConfig(attributes={"man": ["man"]})
    with pytest.raises(ValueError, match="no example carries"):
        balance([("s/1", "a man", None), ("s/2", "a dog", None)], BalanceConfig(attributes=GENDER))
    with pytest.raises(ValueError, match="not unique"):
        balance([("s/1", "a man", None), ("s/1", "a woman", None)], BalanceConfig(attributes=GENDER))


def test_the_loader_skips_and_counts_every_dropped_sample(tmp_path):
    """A table's dropped keys never reach the sample function and each is counted under
    `filtered_balance`; every other sample is delivered once."""
    import io
    import tarfile

    from PIL import Image

    from siglip2.data.balance import FILTER_REASON
    from siglip2.data.shards import KeyFilter, _decode_stage, _WorkerStats, read_shards

    urls = []
    for s in range(2):
        path = tmp_path / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(10):
                for ext, data in (("txt", f"caption {s} {i}".encode()), ("jpg", _jpeg(Image, io))):
                    info = tarfile.TarInfo(f"{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    table = tmp_path / "keep.tsv"
    dropped = {table_key(urls[0], "0003"), table_key(urls[1], "0003"), table_key(urls[1], "0007")}
    rows = [(table_key(u, f"{i:04d}"), table_key(u, f"{i:04d}") not in dropped) for u in urls for i in range(10)]
    table.write_text("key\tkeep_prob\tkept\n" + "".join(f"{k}\t0.5\t{int(v)}\n" for k, v in rows))
    assert load_dropped(table) == dropped
    assert table_key(urls[0], "0003") == f"{tmp_path.name}/00000.tar/0003"  # folder/file/key
    assert (
        table_key(f"pipe:cat {urls[0]}", "0003") == table_key(f"file:{urls[0]}", "0003") == table_key(urls[0], "0003")
    )
    stats = _WorkerStats()
    seen = []
    out = list(
        _decode_stage(
            read_shards([{"url": u} for u in urls], stats),
            stats,
            lambda d: seen.append(d.key) or {"x": 1},
            10**8,
            False,
            drop=KeyFilter(load_dropped(table), FILTER_REASON),
        )
    )
    assert len(out) == 17 and len(seen) == 17 and stats.counts[FILTER_REASON] == 3
    bad = tmp_path / "bad.tsv"
    bad.write_text("key\tkeep_prob\tkept\nx\t0.5\tmaybe\n")
    with pytest.raises(ValueError, match="malformed"):
        load_dropped(bad)


def _jpeg(Image, io) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_rounding_keeps_what_the_solution_says_when_patterns_are_tiny():
    """Many concepts per caption make most indicator patterns one or two examples: whole-example
    rounding must still keep about n q in total and the keep rate where no bound binds (a
    per-pattern round would keep every one-example pattern at q > 0.5)."""
    rng = np.random.default_rng(1)
    words = [f"c{i}" for i in range(12)]
    ex = []
    for i in range(3000):
        g = rng.choice(["man", "woman", ""], p=[0.45, 0.25, 0.3])
        tags = [w for w in words if rng.random() < 0.3]
        ex.append((f"s/{i}", " ".join([g, *tags]).strip(), None))
    cfg = BalanceConfig(attributes=GENDER, concepts={w: [w] for w in words}, keep_rate=0.6, association_tolerance=0.02)
    table = balance(ex, cfg, seed=0)
    assert table.summary["patterns"] > 1000  # mostly patterns of one example
    plain = np.array(["man" not in c for _, c, _ in ex])  # no attribute word: q = keep_rate exactly
    assert abs(table.kept[plain].mean() - 0.6) < 0.03
    assert abs(table.kept.sum() - table.keep_prob.sum()) <= 0.01 * len(ex)  # repair drops a handful at most
    after = table.summary["after"]
    assert after["max_representation_gap"] <= 0.01 + 1e-12 and after["max_association_gap"] <= 0.02 + 1e-12
