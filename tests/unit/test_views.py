"""Self-distillation views (siglip2/data/views.py) against torchvision's own transforms."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from siglip2.config import from_dict
from siglip2.data.views import (
    ViewConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    crop_resize,
    global_view,
    local_views,
    make_views,
    random_hflip,
    random_patch_mask,
    random_resized_crop_boxes,
)

NO_COLOUR = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, jitter_p=0.0, grayscale_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_images(b=4, h=64, w=64, seed=0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=gen(seed)) * 2 - 1


def smooth_images(b=4, h=64, w=64, seed=0) -> torch.Tensor:
    """Blobs in colour (an image a jitter can be checked on): low-res noise upsampled."""
    small = torch.rand(b, 3, h // 8, w // 8, generator=gen(seed))
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


# ------------------------------------------------------------------------------ crop + resize

# integer boxes x1, y1, x2, y2 -> output side; down-, same- and up-sampling (< 3x), inside and on the border
BOXES = [
    ((10, 5, 50, 45), 32),
    ((3, 7, 43, 37), 32),
    ((0, 0, 64, 64), 32),
    ((0, 0, 64, 64), 64),
    ((10, 5, 50, 45), 40),
    ((12, 20, 60, 40), 24),
    ((10, 5, 24, 19), 32),
    ((30, 30, 50, 52), 48),
    ((0, 0, 40, 40), 64),
    ((40, 44, 64, 64), 40),
]


@pytest.mark.parametrize("box,size", BOXES)
def test_crop_resize_is_resized_crop_without_antialias(box, size):
    """roi_align(aligned=True, sampling_ratio=1) is resized_crop(antialias=False) (bilinear,
    half-pixel centres) to float error, except the outermost output rows/columns of an
    upsampled crop that does not touch the image border: resized_crop clamps to the crop's
    edge pixels, roi_align interpolates with the image pixels outside the box."""
    img = noise_images(1)
    x1, y1, x2, y2 = box
    ref = TF.resized_crop(img[0], y1, x1, y2 - y1, x2 - x1, [size, size], antialias=False)
    out = crop_resize(img, torch.tensor([box], dtype=torch.float32), size, sampling_ratio=1)[0]
    assert out.shape == ref.shape == (3, size, size)
    assert (out - ref)[:, 1:-1, 1:-1].abs().max() < 5e-5  # measured <= 1e-5: float32 sample coordinates
    up_y, up_x = y2 - y1 < size, x2 - x1 < size
    inner_y = y1 > 0 or y2 < 64
    inner_x = x1 > 0 or x2 < 64
    if not ((up_y and inner_y) or (up_x and inner_x)):
        assert (out - ref).abs().max() < 5e-5
    else:  # measured: up to ~0.5 on noise, only on the border
        assert (out - ref).abs().max() > 1e-3
    if x2 - x1 <= size and y2 - y1 <= size:  # no downscaling: the adaptive rule takes 1 sample
        assert torch.equal(crop_resize(img, torch.tensor([box], dtype=torch.float32), size), out[None])


def test_adaptive_sampling_is_closer_to_antialias_when_downscaling():
    img = noise_images(2, 128, 128)
    boxes = random_resized_crop_boxes(40, 128, 128, (0.2, 0.4), generator=gen(3))  # 57..83 px -> 32 px
    rois = torch.cat([torch.arange(2).repeat(20)[:, None].float(), boxes], dim=1)
    plain, adaptive = crop_resize(img, rois, 32, sampling_ratio=1), crop_resize(img, rois, 32)
    d_plain, d_adaptive = [], []
    for k, (b, x1, y1, x2, y2) in enumerate(rois.int().tolist()):
        ref = TF.resized_crop(img[b], y1, x1, y2 - y1, x2 - x1, [32, 32], antialias=True)
        d_plain.append((plain[k] - ref).abs().mean())
        d_adaptive.append((adaptive[k] - ref).abs().mean())
    assert torch.stack(d_adaptive).mean() < 0.5 * torch.stack(d_plain).mean()


def test_crop_resize_takes_per_image_or_indexed_boxes():
    img = noise_images(3)
    boxes = torch.tensor([[0, 0, 32, 32], [8, 8, 40, 40], [32, 32, 64, 64]], dtype=torch.float32)
    a = crop_resize(img, boxes, 16)
    b = crop_resize(img, torch.cat([torch.tensor([[0.0], [1.0], [2.0]]), boxes], dim=1), 16)
    assert torch.equal(a, b)
    two = crop_resize(img, torch.tensor([[2.0, 0, 0, 64, 64], [2.0, 0, 0, 64, 64]]), 64, sampling_ratio=1)
    assert torch.allclose(two, img[[2, 2]], atol=1e-6)
    with pytest.raises(ValueError):
        crop_resize(img, boxes[:2], 16)


# ------------------------------------------------------------------------------ crop boxes


def _check_boxes(boxes, h, w, scale, ratio):
    x1, y1, x2, y2 = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    bw, bh = x2 - x1, y2 - y1
    assert (bw > 0).all() and (bh > 0).all()
    # w and h are rounded: the area fraction and the aspect can leave the range by that much
    frac, slack = bw * bh / (h * w), (0.5 * (bw + bh) + 0.25) / (h * w)
    assert (frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all()
    log_aspect, aslack = torch.log(bw / bh), 0.5 / bw + 0.5 / bh
    assert (log_aspect >= math.log(ratio[0]) - aslack).all() and (log_aspect <= math.log(ratio[1]) + aslack).all()
    return frac, log_aspect


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    both = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, both, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, both, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("h,w,scale", [(64, 64, (0.4, 1.0)), (64, 64, (0.05, 0.4)), (48, 80, (0.4, 1.0))])
def test_crop_boxes_follow_torchvision_sampler(h, w, scale):
    """Inside the image, area fraction in `scale` and aspect in `ratio` (up to rounding), and
    the same distribution as RandomResizedCrop.get_params (two-sample KS, p < 0.001 bound)."""
    ratio = (3 / 4, 4 / 3)
    ours = random_resized_crop_boxes(20000, h, w, scale, ratio, generator=gen(1))
    frac, log_aspect = _check_boxes(ours, h, w, scale, ratio)
    torch.manual_seed(0)
    ref = torch.tensor(
        [
            [j, i, j + cw, i + ch]
            for i, j, ch, cw in (
                RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio)) for _ in range(3000)
            )
        ],
        dtype=torch.float32,
    )
    ref_frac, ref_log_aspect = _check_boxes(ref, h, w, scale, ratio)
    centre = lambda b: (b[:, 0] + b[:, 2]) / (2 * w)  # noqa: E731
    for a, b in ((frac, ref_frac), (log_aspect, ref_log_aspect), (centre(ours), centre(ref))):
        assert _ks(a, b) < 0.04
    if scale == (0.05, 0.4) and h == w:  # every candidate fits: the area fraction is ~uniform
        assert abs(frac.mean().item() - 0.225) < 0.005


@pytest.mark.parametrize("h,w", [(10, 100), (100, 10), (20, 30)])
def test_crop_boxes_fallback_is_torchvisions_central_crop(h, w):
    scale = (0.9, 1.0) if h != 20 else (1.0, 1.0)
    ratio = (3 / 4, 4 / 3) if h != 20 else (2.0, 3.0)
    torch.manual_seed(0)
    i, j, ch, cw = RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
    ours = random_resized_crop_boxes(5, h, w, scale, ratio, generator=gen(0))
    assert ours.tolist() == [[j, i, j + cw, i + ch]] * 5


# ------------------------------------------------------------------------------ colour


@pytest.fixture
def colour_batch():
    x = smooth_images(4, 24, 24, seed=5) * 0.5 + 0.5  # [0, 1]
    x[0, :, :4] = 0.5  # gray pixels (hue undefined)
    x[1, :, :, :3] = torch.tensor([1.0, 0.0, 0.0]).reshape(3, 1, 1)  # saturated red (hue wraps)
    x[2, 1:, :6] = 0.0  # ties between channels
    return x


@pytest.mark.parametrize(
    "ours,theirs,factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 1.23]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.77]),
        (adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2, 0.0]),
    ],
)
def test_batched_colour_ops_match_torchvision(colour_batch, ours, theirs, factors):
    out = ours(colour_batch, torch.tensor(factors))
    for k, f in enumerate(factors):
        assert (out[k] - theirs(colour_batch[k], f)).abs().max() < 1e-6


def test_hue_matches_torchvision(colour_batch):
    factors = [-0.1, 0.0, 0.1, 0.5]
    out = adjust_hue(colour_batch, torch.tensor(factors))
    for k, f in enumerate(factors):
        assert (out[k] - TF.adjust_hue(colour_batch[k], f)).abs().max() < 1e-5


def test_color_jitter_is_torchvision_colorjitter_in_its_drawn_order():
    """Recompute the drawn parameters (documented draw: (B, 10) uniforms) and apply
    torchvision's functional ops per image in each sample's order."""
    x = smooth_images(8, 16, 16, seed=2)
    out = color_jitter(x, generator=gen(7), p=0.8, grayscale_p=0.2)
    u = torch.rand(8, 10, generator=gen(7))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    strength = [0.4, 0.4, 0.2]
    for k in range(8):
        img = x[k] * 0.5 + 0.5
        if u[k, 0] < 0.8:
            factors = [1 - s + 2 * s * u[k, 1 + i].item() for i, s in enumerate(strength)]
            factors.append(0.1 * (2 * u[k, 4].item() - 1))
            for op in u[k, 5:9].argsort().tolist():
                img = ops[op](img, factors[op])
        if u[k, 9] < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        assert (out[k] - (img * 2 - 1)).abs().max() < 2e-5, k


def test_color_jitter_identity_and_grayscale():
    x = smooth_images(4, 16, 16)
    assert torch.allclose(color_jitter(x, generator=gen(), p=0.0, grayscale_p=0.0), x, atol=1e-6)
    g = color_jitter(x, generator=gen(), p=0.0, grayscale_p=1.0)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    j = color_jitter(x, generator=gen(), p=1.0, grayscale_p=0.0)
    assert j.min() >= -1 and j.max() <= 1 and not torch.allclose(j, x, atol=1e-2)


# ------------------------------------------------------------------------------ views


def test_flip_is_per_sample_and_exact():
    x = noise_images(64, 8, 8)
    out, flip = random_hflip(x, 0.5, generator=gen())
    assert 16 < flip.sum() < 48
    assert torch.equal(out[flip], x[flip].flip(-1)) and torch.equal(out[~flip], x[~flip])
    cfg = ViewConfig(ratio=(1.0, 1.0), flip_p=1.0, sampling_ratio=1, **NO_COLOUR)
    full = global_view(x[:4], gen(), scale=(1.0, 1.0), config=cfg)
    assert torch.allclose(full, x[:4].flip(-1), atol=1e-6)


def test_shapes_range_and_view_major_order():
    b, n = 3, 5
    colours = torch.tensor([[-1.0, 0.0, 1.0], [0.5, -0.5, 0.25], [1.0, 1.0, -1.0]])
    x = colours[:, :, None, None].expand(b, 3, 64, 64).clone()
    loc = local_views(x, gen(), n=n, size=32, config=ViewConfig(**NO_COLOUR))
    assert loc.shape == (n * b, 3, 32, 32) and loc.dtype == torch.float32
    per_view = loc.unflatten(0, (n, b))  # (n, B, 3, s, s): view v of image b
    assert torch.allclose(per_view.mean(dim=(-2, -1)), colours.expand(n, b, 3), atol=1e-6)

    imgs = smooth_images(4, 64, 64)
    v = make_views(imgs, gen(), ViewConfig(local_size=32), patch_size=8)
    assert v.global_view.shape == (4, 3, 64, 64) and v.local_views.shape == (32, 3, 32, 32)
    assert v.mask.shape == (4, 64) and v.mask.dtype == torch.bool and (v.mask.sum(1) == 32).all()
    assert v.global_boxes.shape == (4, 4) and v.local_boxes.shape == (32, 4) and v.local_flip.shape == (32,)
    for t in (v.global_view, v.local_views):
        assert t.min() >= -1 and t.max() <= 1 and torch.isfinite(t).all()
    assert torch.equal(v.global_boxes, torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(4, 4))  # the full image
    _check_boxes(v.local_boxes, 64, 64, (0.05, 0.4), (3 / 4, 4 / 3))
    crops = make_views(imgs, gen(), ViewConfig(local_size=32, global_scale=(0.4, 1.0)), patch_size=8)
    _check_boxes(crops.global_boxes, 64, 64, (0.4, 1.0), (3 / 4, 4 / 3))  # DINO's crop, as an option
    assert global_view(imgs, gen(), size=48).shape == (4, 3, 48, 48)
    # a view that is not a multiple of the patch: the tower's grid is size // patch (vit.patchify)
    assert make_views(imgs, gen(), ViewConfig(global_size=60), patch_size=16).mask.shape == (4, 9)
    with pytest.raises(ValueError):
        make_views(imgs, gen(), ViewConfig(global_size=12), patch_size=16)


def test_the_default_global_view_is_the_whole_image():
    """The paper [P §2.3]: the teacher's representation is "derived from the full image", and
    the masked student sees the same view: without colour and flip the default global view is
    the batch's image itself, pixel for pixel; with them, only flipped and jittered."""
    imgs = smooth_images(4, 64, 64)
    plain = make_views(imgs, gen(), ViewConfig(local_size=32, flip_p=0.0, **NO_COLOUR), patch_size=8)
    torch.testing.assert_close(plain.global_view, imgs, rtol=0, atol=1e-6)
    flipped = make_views(imgs, gen(), ViewConfig(local_size=32, flip_p=1.0, **NO_COLOUR), patch_size=8)
    torch.testing.assert_close(flipped.global_view, imgs.flip(-1), rtol=0, atol=1e-6)


def test_same_generator_state_same_views():
    imgs = smooth_images(4, 64, 64)
    cfg = ViewConfig(local_size=32)
    g = gen(123)
    state = g.get_state()
    a = make_views(imgs, g, cfg, patch_size=8)
    b = make_views(imgs, g, cfg, patch_size=8)  # the stream moved on: new views
    g.set_state(state)  # a resumed run restores the state from its checkpoint
    c = make_views(imgs, g, cfg, patch_size=8)
    for x, y in zip(a, c):
        assert torch.equal(x, y)
    assert not torch.equal(a.global_view, b.global_view) and not torch.equal(a.mask, b.mask)
    d = make_views(imgs, gen(124), cfg, patch_size=8)
    assert not torch.equal(a.local_views, d.local_views)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_gives_the_same_views_on_gpu():
    imgs = smooth_images(4, 64, 64)
    cfg = ViewConfig(local_size=32)
    cpu = make_views(imgs, gen(5), cfg, patch_size=8)
    gpu = make_views(imgs.cuda(), gen(5), cfg, patch_size=8)
    assert gpu.global_view.is_cuda and gpu.mask.is_cuda
    assert torch.equal(cpu.mask, gpu.mask.cpu()) and torch.equal(cpu.local_boxes, gpu.local_boxes.cpu())
    assert (cpu.global_view - gpu.global_view.cpu()).abs().max() < 1e-4
    assert (cpu.local_views - gpu.local_views.cpu()).abs().max() < 1e-4


# ------------------------------------------------------------------------------ mask


@pytest.mark.parametrize("n,ratio", [(64, 0.5), (36, 0.5), (256, 0.5), (49, 0.3), (10, 0.0), (10, 1.0)])
def test_mask_has_exactly_the_ratio_per_row(n, ratio):
    m = random_patch_mask(512, n, ratio, generator=gen())
    assert m.shape == (512, n) and m.dtype == torch.bool
    assert (m.sum(1) == round(ratio * n)).all()
    if 0 < ratio < 1:
        assert len({tuple(r) for r in m.tolist()}) > 500  # rows differ
        assert (m.float().mean(0) - ratio).abs().max() < 0.12  # every position, about uniformly


def test_mask_positions_are_uniform():
    m = random_patch_mask(20000, 64, 0.5, generator=gen(9))
    assert (m.float().mean(0) - 0.5).abs().max() < 0.015  # 4.2 sigma at n = 20000


# ------------------------------------------------------------------------------ config


def test_view_config_defaults_and_yaml():
    c = ViewConfig()
    assert (c.global_scale, c.local_scale, c.local_count, c.local_size) == (None, (0.05, 0.4), 8, 96)
    assert (c.brightness, c.contrast, c.saturation, c.hue, c.jitter_p, c.grayscale_p) == (0.4, 0.4, 0.2, 0.1, 0.8, 0.2)
    assert (c.flip_p, c.mask_ratio, c.global_size) == (0.5, 0.5, None)
    d = from_dict(ViewConfig, {"local_size": 32, "local_scale": [0.1, 0.3]})
    assert d.local_size == 32 and d.local_scale == (0.1, 0.3)
    with pytest.raises(ValueError):
        from_dict(ViewConfig, {"local_sise": 32})
    with pytest.raises(ValueError):
        ViewConfig(global_scale=(0.4, 1.5))
