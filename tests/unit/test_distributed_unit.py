"""`siglip2.distributed.check_same_shape` without processes: the shape check is cached per
shape only off the CPU (the check on 2 gloo ranks with unequal batches:
tests/e2e/test_distributed.py)."""

from __future__ import annotations

import torch


def test_check_is_cached_per_shape_only_off_the_cpu(monkeypatch):
    """On accelerators a shape already found equal is not gathered again (no host sync per
    step); CPU tensors are checked on every call (no device to sync)."""
    import siglip2.distributed as d

    gathers = []
    monkeypatch.setattr(d, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(d.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(d.dist, "all_gather", lambda out, t, group=None: (gathers.append(1), [o.copy_(t) for o in out]))
    monkeypatch.setattr(d, "_CHECKED_SHAPES", set())
    x = torch.zeros(3, 4)
    for _ in range(3):
        d.check_same_shape(x)
    assert len(gathers) == 3
    gathers.clear()
    d._CHECKED_SHAPES.clear()
    monkeypatch.setattr(d, "_reading_syncs", lambda t: True)  # as for a CUDA tensor
    for shape in [(3, 4), (3, 4), (2, 4), (3, 4), (2, 4), (2, 5)]:
        d.check_same_shape(torch.zeros(shape))
    assert len(gathers) == 3  # once per new shape
