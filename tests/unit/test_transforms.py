"""Image transform: shape, value range, and boxes that stay on their pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from siglip2.data.transforms import ImageTransform, boxes_keep_mask


def rect_image(w=96, h=64, box=(50, 12, 81, 47)):
    """Black image with a white filled rectangle; returns (image, normalised box)."""
    img = Image.new("RGB", (w, h), (0, 0, 0))
    x1, y1, x2, y2 = box  # inclusive pixel corners
    ImageDraw.Draw(img).rectangle([x1, y1, x2, y2], fill=(255, 255, 255))
    return img, torch.tensor([[x1 / w, y1 / h, (x2 + 1) / w, (y2 + 1) / h]])


def test_shape_dtype_range():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    for tf in (ImageTransform(32), ImageTransform((24, 48), random_resized_crop=True, hflip=True)):
        x, b = tf(img)
        assert b is None and x.dtype == torch.float32
        assert x.shape == (3, *tf.size)
        assert x.min() >= -1 and x.max() <= 1
    x, _ = ImageTransform(16)(Image.new("RGB", (33, 17), (0, 51, 255)))
    expected = torch.tensor([-1.0, 51 / 127.5 - 1, 1.0])
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-6)


def test_resize_is_antialiased():
    # every third column white, shrunk 8x: antialiasing averages each output pixel over
    # ~8 columns (1/3 white); plain bilinear samples two columns and gets -1, 0 or 1
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, ::3] = 255
    x, _ = ImageTransform(8)(Image.fromarray(arr))
    assert (x - (85 / 127.5 - 1)).abs().max() < 0.15


def _check_box_on_rect(x, box):
    """The box covers the white pixels, and what it covers is white."""
    _, H, W = x.shape
    white = x.mean(0) > 0.0  # > mid grey
    x1, y1, x2, y2 = (box * torch.tensor([W, H, W, H])).tolist()
    ys, xs = torch.nonzero(white, as_tuple=True)
    # every white pixel centre lies inside the box (1 px slack for the antialias edge)
    assert (xs + 0.5 >= x1 - 1).all() and (xs + 0.5 <= x2 + 1).all()
    assert (ys + 0.5 >= y1 - 1).all() and (ys + 0.5 <= y2 + 1).all()
    # and the box interior (1 px in from each side) is white
    inner = white[int(np.ceil(y1)) + 1 : int(np.floor(y2)) - 1, int(np.ceil(x1)) + 1 : int(np.floor(x2)) - 1]
    if inner.numel():
        assert inner.float().mean() > 0.95


def test_boxes_follow_crop_resize_and_flip():
    img, box = rect_image()
    tf = ImageTransform(48, random_resized_crop=True, scale=(0.15, 1.0), hflip=True)
    kept = dropped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, b = tf(img, box)
        assert b.shape == (1, 4) and (b >= 0).all() and (b <= 1).all()
        if boxes_keep_mask(b)[0]:
            kept += 1
            _check_box_on_rect(x, b[0])
        else:
            dropped += 1
            assert (x.mean(0) > 0.0).sum() <= 1, "box said gone but the rectangle is visible"
    assert kept >= 10 and dropped >= 1  # both paths exercised with these seeds


def test_flip_moves_box_with_pixels():
    img, box = rect_image()  # rectangle on the right half
    tf = ImageTransform((32, 48), hflip=True)
    sides = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, b = tf(img, box)
        _check_box_on_rect(x, b[0])
        sides.add("right" if b[0, 0] > 0.5 else "left")
        if b[0, 0] < 0.5:  # mirrored: x1' = 1 - x2
            assert torch.allclose(b[0], torch.tensor([1 - box[0, 2], box[0, 1], 1 - box[0, 0], box[0, 3]]))
    assert sides == {"left", "right"}


def test_plain_resize_keeps_normalised_boxes():
    img, box = rect_image()
    x, b = ImageTransform(40)(img, box)
    assert torch.allclose(b, box, atol=1e-6)
    _check_box_on_rect(x, b[0])


def test_keep_mask():
    b = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.2, 0.3, 0.9], [1.0, 0.0, 1.0, 0.0], [0.2, 0.2, 0.21, 0.9]])
    assert boxes_keep_mask(b).tolist() == [True, False, False, True]
    assert boxes_keep_mask(b, min_size=0.05).tolist() == [True, False, False, False]
    assert boxes_keep_mask(torch.zeros(0, 4)).shape == (0,)


def test_bad_scale():
    with pytest.raises(ValueError):
        ImageTransform(32, random_resized_crop=True, scale=(0.0, 1.0))


def test_output_is_contiguous_and_min_source_size():
    img = Image.new("RGB", (70, 40), (10, 20, 30))
    x, _ = ImageTransform((24, 48), random_resized_crop=True, hflip=True)(img)
    assert x.is_contiguous() and x.shape == (3, 24, 48)
    assert ImageTransform(64).min_source_size() == (64, 64)
    assert ImageTransform((32, 48)).min_source_size() == (48, 32)  # (w, h), like PIL sizes
    # the smallest random crop (area 0.5, aspect 4/3) must still cover 64 px: 64 * sqrt(4/3 / 0.5)
    assert ImageTransform(64, random_resized_crop=True, scale=(0.5, 1.0)).min_source_size() == (105, 105)
