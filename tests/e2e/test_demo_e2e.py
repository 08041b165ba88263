"""The demo's cache under concurrent callers: two processes asking for the same demo build it
once (the rest of the generator: tests/unit/test_demo_unit.py, tests/integration/test_demo.py)."""

from __future__ import annotations

import multiprocessing as mp

from siglip2.data import demo
from test_demo import TINY, read_samples


def _concurrent_call(root, q):
    d = demo.ensure_demo(root, seed=5, workers=1, **TINY)
    q.put((d.built, d.train_urls))


def test_concurrent_callers_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    root = str(tmp_path / "shared")
    procs = [ctx.Process(target=_concurrent_call, args=(root, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [q.get(timeout=5) for _ in procs]
    assert sorted(r[0] for r in results) == [False, True]  # one built, the other waited and reused
    assert results[0][1] == results[1][1]
    assert len(read_samples(results[0][1])) == TINY["num_train"]
