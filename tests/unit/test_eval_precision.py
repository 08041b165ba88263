"""Evaluation precision: bf16 towers and TF32 on CUDA, nothing changed on CPU (no GPU here:
the CUDA branch is checked by inspecting the contexts and the autocast state a stub sees)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from siglip2.eval import suite
from siglip2.eval.precision import eval_precision, is_cuda, tower_autocast

MICRO = {
    "name": "micro",
    "embed_dim": 16,
    "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=2, image_size=8),
    "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=10, max_len=4),
}


def _flags():
    return (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
    )


def test_cpu_evaluation_is_plain_fp32():
    from siglip2.model import build_model

    assert isinstance(tower_autocast("cpu"), contextlib.nullcontext)
    assert isinstance(tower_autocast(torch.device("cpu")), contextlib.nullcontext) and not is_cuda(None)
    before = _flags()
    torch.manual_seed(0)
    model = build_model(MICRO).eval()
    image = torch.rand(3, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        ref = model.encode_image(image=image)
        with eval_precision("cpu"):
            assert _flags() == before
            out = suite._encode(model, {"image": image}, "cpu")
    assert _flags() == before
    assert out.tokens.dtype == torch.float32 and torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.embeds, ref.embeds)


def _pretend_cuda(monkeypatch):
    """What torch.autocast asks before it turns CUDA autocast on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_picks_bf16_autocast_and_tf32_and_restores(device, monkeypatch):
    _pretend_cuda(monkeypatch)
    ctx = tower_autocast(device)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert ctx._enabled
    before = _flags()
    with eval_precision(device):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert _flags() == before
    with pytest.raises(RuntimeError), eval_precision(device):  # restored on error too
        raise RuntimeError
    assert _flags() == before


class _Moves:
    """Stands for a batch tensor: `.to(device)` keeps it (no CUDA tensors here)."""

    dtype = torch.float32

    def to(self, device):
        return self


def test_suite_runs_the_towers_under_cuda_autocast(monkeypatch):
    """What a tower called by the suite sees on a CUDA device: autocast on, bf16 (CUDA's
    autocast flags are thread-local state, settable without a GPU once torch believes one
    exists); and on CPU: autocast off."""
    seen = []

    class Tower:
        def encode_image(self, **kwargs):
            seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
            return "tokens"

    _pretend_cuda(monkeypatch)
    assert suite._encode(Tower(), {"image": _Moves()}, torch.device("cuda")) == "tokens"
    assert (
        suite._encode(
            Tower(),
            {"patches": _Moves(), "patch_coord": _Moves(), "patch_valid": _Moves(), "spatial_shapes": _Moves()},
            "cuda",
        )
        == "tokens"
    )
    assert seen == [(True, torch.bfloat16)] * 2
    assert not torch.is_autocast_enabled("cuda")  # left on exit
    seen.clear()
    suite._encode(Tower(), {"image": _Moves()}, "cpu")
    assert seen == [(False, torch.get_autocast_dtype("cuda"))]
    # the zero-shot classifier's text tower goes through the same context
    text = suite._under(tower_autocast, "cuda", lambda tokens: torch.is_autocast_enabled("cuda"))
    assert (
        text(None) is True
        and suite._under(tower_autocast, "cpu", lambda t: torch.is_autocast_enabled("cuda"))(0) is False
    )
