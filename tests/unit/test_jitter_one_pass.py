"""Colour jitter in one pass: each op once per image, the same images as before.

The previous implementation ran all four positions of ColorJitter's random order over the
whole batch, each with a brightness/contrast/saturation blend *and* a hue rotation (an HSV
round trip), keeping per sample the op its order names: four hue passes per call. It is kept
here, verbatim but for names, as the reference: on the same generator state the one-pass
version gives bit-identical images (same draws, same ops in the same per-sample order), so
the distribution is unchanged. `tests/unit/test_views.py` checks both against torchvision's
functional ops per image.
"""

from __future__ import annotations

import pytest
import torch

from siglip2.data import views
from siglip2.data.views import _blend, _rand, adjust_hue, color_jitter, rgb_to_grayscale


def _previous_color_jitter(
    images, *, generator=None, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8, grayscale_p=0.2
):
    u = _rand(images.shape[0], 10, generator=generator).to(images.device, non_blocking=True)
    apply, order, gray_flag = u[:, 0] < p, u[:, 5:9].argsort(dim=1), u[:, 9] < grayscale_p
    strengths = torch.tensor([brightness, contrast, saturation], dtype=u.dtype, device=u.device)
    factors = torch.cat(
        [(1.0 - strengths).clamp(min=0.0) + 2.0 * strengths * u[:, 1:4], hue * (2.0 * u[:, 4:5] - 1.0)], dim=1
    ).to(images.dtype)
    x = ((images + 1.0) * 0.5).clamp(0.0, 1.0)
    out = x
    for pos in range(4):
        op = order[:, pos]
        f = factors.gather(1, op[:, None]).reshape(-1, 1, 1, 1)
        gray = rgb_to_grayscale(out)
        target = torch.where(
            (op == 0).reshape(-1, 1, 1, 1),
            torch.zeros_like(gray),
            torch.where((op == 1).reshape(-1, 1, 1, 1), gray.mean(dim=(-3, -2, -1), keepdim=True), gray),
        )
        blended = _blend(out, target, torch.where(op.reshape(-1, 1, 1, 1) == 3, torch.ones_like(f), f))
        if hue > 0:
            blended = torch.where((op == 3).reshape(-1, 1, 1, 1), adjust_hue(out, factors[:, 3]), blended)
        else:
            blended = torch.where((op == 3).reshape(-1, 1, 1, 1), out, blended)
        out = blended
    out = torch.where(apply.reshape(-1, 1, 1, 1), out, x)
    out = torch.where(gray_flag.reshape(-1, 1, 1, 1), rgb_to_grayscale(out).expand_as(out), out)
    return out * 2.0 - 1.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # DINO's
        {"hue": 0.0},
        {"p": 1.0, "grayscale_p": 0.0},
        {"brightness": 0.0, "saturation": 0.9, "hue": 0.5},
        {"brightness": 1.5, "contrast": 2.0, "saturation": 0.0},  # factors clamped at 0
    ],
)
def test_one_pass_gives_the_previous_images_bit_for_bit(settings):
    for seed in range(6):
        x = torch.rand(32, 3, 10, 10, generator=_gen(100 + seed)) * 2 - 1
        x[:4, :, :3] = 0.0  # gray pixels, hue undefined
        new = color_jitter(x, generator=_gen(seed), **settings)
        old = _previous_color_jitter(x, generator=_gen(seed), **settings)
        assert torch.equal(new, old), (seed, (new - old).abs().max())
    # every one of the 24 orders occurs in the batches above (the hue at each position)
    orders = {tuple(r) for s in range(6) for r in torch.rand(32, 10, generator=_gen(s))[:, 5:9].argsort(1).tolist()}
    assert len(orders) == 24


def test_one_hsv_round_trip_per_call(monkeypatch):
    calls = []
    to_hsv = views._rgb_to_hsv
    monkeypatch.setattr(views, "_rgb_to_hsv", lambda images: calls.append(images.shape) or to_hsv(images))
    color_jitter(torch.rand(8, 3, 6, 6) * 2 - 1, generator=_gen(0))
    assert len(calls) == 1  # was 4: one per position of the order
    color_jitter(torch.rand(8, 3, 6, 6) * 2 - 1, generator=_gen(0), hue=0.0)
    assert len(calls) == 1  # no hue, no HSV
