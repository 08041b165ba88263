"""Boxes: quantise / text / parse round trip, and boxes that follow crops and flips."""

import random

import pytest
import torch

from siglip2.data.boxes import (
    boxes_valid,
    box_to_text,
    crop_boxes,
    dequantize_box,
    hflip_boxes,
    pad_boxes,
    parse_box,
    quantize_box,
    resize_boxes,
)


@pytest.mark.parametrize("bins", [500, 7])
def test_quantize_round_trip_within_half_bin(bins):
    rng = random.Random(0)
    boxes = [[0.0, 0.0, 1.0, 1.0], [0.24, 0.5, 0.999, 0.7]]
    for _ in range(200):
        x1, x2 = sorted(rng.random() for _ in range(2))
        y1, y2 = sorted(rng.random() for _ in range(2))
        boxes.append([x1, y1, x2, y2])
    for box in boxes + [torch.tensor(b, dtype=torch.float32) for b in boxes[:20]]:
        q = quantize_box(box, bins)
        assert all(0 <= v < bins for v in q)
        back = dequantize_box(q, bins)
        err = (torch.tensor(back, dtype=torch.float64) - torch.as_tensor(box, dtype=torch.float64)).abs().max()
        assert err <= 0.5 / bins + 1e-6
        assert parse_box(box_to_text(box, bins), bins) == back


def test_box_text_format_and_float32_boundaries():
    assert box_to_text([0.075, 0.24, 0.5, 0.803]) == "37 120 250 401"
    # the same box stored as float32 (0.24 -> 0.23999999) still lands in bin 120
    assert box_to_text(torch.tensor([0.075, 0.24, 0.5, 0.803])) == "37 120 250 401"
    assert quantize_box([0.0, 0.0, 1.0, 1.0]) == [0, 0, 499, 499]
    assert dequantize_box([0, 0, 499, 499]) == [0.001, 0.001, 0.999, 0.999]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "1 2 3",
        "600 1 700 2",
        "5 5 1 1",
        "9" * 5000 + " 1 2 3",
        "1 2 3 " + "4" * 20,
        None,
        42,
        "a b c d",
    ],
)
def test_parse_box_rejects_garbage(text):
    assert parse_box(text) is None


def test_parse_box_tolerates_surroundings():
    want = dequantize_box([37, 120, 250, 401])
    for text in ["37 120 250 401", " 37  120 250 401 ", "box: 37 120 250 401 and more 1 2", "37,120,250,401"]:
        assert parse_box(text) == want
    assert parse_box("3 3 3 3") == dequantize_box([3, 3, 3, 3])  # degenerate but well formed


def test_crop_boxes_by_hand():
    box = [[0.2, 0.2, 0.6, 0.6], [0.0, 0.0, 0.05, 0.05]]
    out = crop_boxes(box, [0.1, 0.2, 0.5, 0.6])
    torch.testing.assert_close(out[0], torch.tensor([0.25, 0.0, 1.0, 1.0]))
    assert boxes_valid(out).tolist() == [True, False]  # the second box lies outside the crop
    px = crop_boxes(box, [20, 30, 100, 90], image_size=(200, 150))  # same crop, in pixels
    torch.testing.assert_close(px, crop_boxes(box, [0.1, 0.2, 0.5, 0.6]))


def test_hflip_resize_pad_by_hand():
    b = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(hflip_boxes(b), torch.tensor([[0.7, 0.2, 0.9, 0.4]]))
    torch.testing.assert_close(hflip_boxes(hflip_boxes(b)), b)
    torch.testing.assert_close(resize_boxes(b, (640, 480), (224, 224)), b)
    torch.testing.assert_close(pad_boxes(b, (50, 100), (100, 100)), torch.tensor([[0.05, 0.2, 0.15, 0.4]]))
    assert crop_boxes([], [0, 0, 1, 1]).shape == (0, 4) and hflip_boxes([]).shape == (0, 4)


def _bbox_of(mask: torch.Tensor) -> torch.Tensor:
    """Normalised x1y1x2y2 of the True pixels (pixel edges, not centres)."""
    h, w = mask.shape
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], dtype=torch.float32)


def test_boxes_follow_the_pixels_through_crop_and_flip():
    """Paint a box into an image, crop and flip the *pixels*, and find the box again."""
    g = torch.Generator().manual_seed(0)
    W, H = 120, 90
    for _ in range(20):
        x1, x2 = sorted(torch.randint(0, W, (2,), generator=g).tolist())
        y1, y2 = sorted(torch.randint(0, H, (2,), generator=g).tolist())
        x2, y2 = x2 + 1, y2 + 1
        img = torch.zeros(H, W, dtype=torch.bool)
        img[y1:y2, x1:x2] = True
        box = [x1 / W, y1 / H, x2 / W, y2 / H]
        cx1, cy1 = max(0, x1 - 5), max(0, y1 - 7)  # a crop that keeps part of the box
        cx2, cy2 = min(W, x1 + 30), min(H, y1 + 20)
        crop = img[cy1:cy2, cx1:cx2].flip(1)
        want = _bbox_of(crop)
        got = hflip_boxes(crop_boxes(box, [cx1, cy1, cx2, cy2], image_size=(W, H)))[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
