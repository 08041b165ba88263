"""Your own shards: uint8 batches normalised on the device, per-batch tokenisation with a
SentencePiece tokenizer trained on the shards' captions, and caption noise (the tokenizer CLI
`python -m siglip2.data.tokenizer train`, training on the shards and docs/own_data.md's commands:
tests/e2e/test_own_data_e2e.py; a checkpoint of another vocabulary:
tests/integration/test_own_data_integration.py)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip2.data.decode import DecodedSample
from siglip2.data.locca_targets import IGNORE, LoccaFormat, encode_example, prompt_ids, prompt_text, region_boxes
from siglip2.data.boxes import box_to_text
from siglip2.data.samples import TrainSample, sample_seed
from siglip2.data.transforms import ImageTransform, normalize_pixels

# Captions in several scripts, as web alt-text is: Latin with accents, Cyrillic, Greek, Arabic,
# Hebrew, Devanagari, Thai, CJK, Hangul, emoji, digits.
CAPTIONS = [
    "A red bicycle leaning on a wall",
    "Café au lait sur une table en bois",
    "Ein Hund läuft über die Wiese",
    "Кошка спит на диване",
    "Ένα σπίτι δίπλα στη θάλασσα",
    "قطة صغيرة على السرير",
    "ילד משחק בכדור בגן",
    "एक लाल गाड़ी सड़क पर",
    "แมวนอนอยู่บนโซฟา",
    "桌子上有三个苹果",
    "公園で遊ぶ子どもたち",
    "바다 위의 작은 배",
    "Sunset over the mountains 🌄 in 2024",
    "Mañana iremos a la playa",
    "Zwei Katzen und 3 Hunde",
]


def write_shards(folder: Path, n_shards: int = 2, per_shard: int = 30, seed: int = 0) -> str:
    """Tars in img2dataset layout (jpg + txt + json with regions); returns the brace pattern."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
                caption = CAPTIONS[(s * per_shard + i) % len(CAPTIONS)]
                meta = {"regions": [{"caption": "a thing", "box": [0.1, 0.2, 0.6, 0.9]}], "lang": "xx"}
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def test_uint8_batches_normalised_on_the_device_equal_the_float_pipeline():
    """The loader now carries uint8 pixels; `normalize_pixels` after the transfer must give
    what the float32 pipeline gave (within 1/255), for square views (with random crops and
    flips) and for NaFlex patches."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(
            rng.integers(0, 255, (int(rng.integers(30, 200)), int(rng.integers(30, 200)), 3), dtype=np.uint8)
        )
        for _ in range(8)
    ]
    for kwargs in ({}, {"random_resized_crop": True, "scale": (0.2, 1.0), "hflip": True}):
        torch.manual_seed(0)
        floats = torch.stack([ImageTransform(48, **kwargs)(im)[0] for im in images])
        torch.manual_seed(0)
        raw = torch.stack([ImageTransform(48, dtype="uint8", **kwargs)(im)[0] for im in images])
        assert raw.dtype == torch.uint8 and floats.dtype == torch.float32
        out = normalize_pixels({"image": raw, "key": ["k"] * 8})
        assert out["image"].dtype == torch.float32 and out["key"] == ["k"] * 8
        assert (out["image"] - floats).abs().max() <= 1 / 255
    from siglip2.data.naflex import patchify_image, resize_for_max_patches

    x = torch.from_numpy(rng.integers(0, 255, (3, 70, 130), dtype=np.uint8))
    patches, _ = patchify_image(resize_for_max_patches(x, 8, 64), 8)
    reference, _ = patchify_image(resize_for_max_patches(x, 8, 64).float() / 127.5 - 1.0, 8)
    assert (normalize_pixels({"patches": patches})["patches"] - reference).abs().max() <= 1 / 255


@pytest.fixture(scope="module")
def shard_tokenizer(tmp_path_factory):
    from siglip2.data.tokenizer import train_shard_tokenizer

    folder = tmp_path_factory.mktemp("own-shards")
    pattern = write_shards(folder / "shards")
    summary = train_shard_tokenizer(pattern, 400, str(folder / "tok"))
    return pattern, summary


def test_per_batch_tokenisation_equals_per_sample(shard_tokenizer):
    """`TrainSample.collate` tokenises captions and LocCa texts in batch calls; the ids must
    be those of encoding each sample on its own (the former per-sample path, rebuilt here from
    `encode` and `encode_example`)."""
    from siglip2.data.tokenizer import build_tokenizer

    _, summary = shard_tokenizer
    tok = build_tokenizer(summary["path"], length=24)
    fmt = LoccaFormat(max_len=24)
    fn = TrainSample(tok, ImageTransform(16, dtype="uint8"), seed=3, epoch=1, locca=fmt)
    samples = []
    for i, caption in enumerate(CAPTIONS + ["", "a very long caption " * 8]):
        regions = [
            {"caption": f"region {j} {caption[:6]}", "box": [0.1 * j, 0.1, 0.1 * j + 0.3, 0.5]} for j in range(i % 3)
        ]
        samples.append(
            DecodedSample(
                key=f"k{i}", image=Image.new("RGB", (20, 30)), caption=caption, meta={"regions": regions}, mask=None
            )
        )
    batch = fn.collate([fn(s) for s in samples])
    for i, s in enumerate(samples):
        ids = tok.encode(s.caption)
        ids = ids if len(ids) <= 24 else ids[:23] + [tok.eos_id]
        assert batch["text"][i].tolist() == ids + [tok.pad_id] * (24 - len(ids))
        rng = random.Random(sample_seed(3, 1, s.key))
        regions = s.meta["regions"]
        moved = ImageTransform(16)(s.image, region_boxes(regions))[1] if regions else None
        usable = [(r["caption"], moved[j]) for j, r in enumerate(regions)]
        want = {"cap": None, "aref": None, "gcap": None}
        if s.caption.strip():
            want["cap"] = encode_example(
                prompt_ids(tok, prompt_text("cap", fmt)), tok.encode(s.caption), 24, tok.pad_id
            )
        if usable:
            cap, box = usable[rng.randrange(len(usable))]
            want["aref"] = encode_example(
                prompt_ids(tok, prompt_text("aref", fmt, caption=cap)),
                tok.encode(box_to_text(box, fmt.bins)),
                24,
                tok.pad_id,
                truncate=False,
            )
            cap, box = usable[rng.randrange(len(usable))]
            want["gcap"] = encode_example(
                prompt_ids(tok, prompt_text("gcap", fmt, box=box)), tok.encode(cap), 24, tok.pad_id
            )
        for task, expected in want.items():
            assert bool(batch[f"locca_{task}_valid"][i]) == (expected is not None), (i, task)
            if expected is None:
                assert (batch[f"locca_{task}_target"][i] == IGNORE).all()
            else:
                assert batch[f"locca_{task}_input"][i].tolist() == expected[0].tolist(), (i, task)
                assert batch[f"locca_{task}_target"][i].tolist() == expected[1].tolist(), (i, task)
    assert batch["image"].dtype == torch.uint8 and batch["caption"] == [s.caption for s in samples]


def test_caption_noise_replaces_that_share_by_other_samples_captions(shard_tokenizer):
    """`data.caption_noise` p (issue 28, for ACID): about p of the samples get another sample's
    caption (one this worker delivered before, never their own), the same samples whatever the
    order they arrive in (another worker, another epoch), the LocCa captioning target follows
    the replaced caption, and the batch says which were replaced."""
    from siglip2.data.tokenizer import build_tokenizer

    _, summary = shard_tokenizer
    tok = build_tokenizer(summary["path"], length=24)
    fmt = LoccaFormat(max_len=24)
    samples = [
        DecodedSample(
            key=f"k{i:05d}", image=Image.new("RGB", (8, 8)), caption=f"caption number {i}", meta={}, mask=None
        )
        for i in range(3000)
    ]
    fn = TrainSample(tok, ImageTransform(8, dtype="uint8"), seed=3, epoch=0, locca=fmt, caption_noise=0.3)
    out = [fn(s) for s in samples]
    noisy = [bool(o["caption_noisy"]) for o in out]
    share = sum(noisy) / len(noisy)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(noisy)) ** 0.5, share  # binomial, 4 sigma
    for i, (s, o) in enumerate(zip(samples, out)):
        if noisy[i]:
            j = int(o["caption"].split()[-1])
            assert j != i and i - TrainSample.NOISE_POOL <= j < i, (i, j)  # a sample seen before, in the pool
            assert o["locca"][0].target == o["caption"]  # Cap learns the caption training sees
        else:
            assert o["caption"] == s.caption
    assert not noisy[0]  # the first sample has no other caption to take
    # another worker sees them in another order, in another epoch: the same samples are noisy
    other = TrainSample(tok, ImageTransform(8, dtype="uint8"), seed=3, epoch=5, caption_noise=0.3)
    again = {s.key: bool(other(s)["caption_noisy"]) for s in reversed(samples)}
    assert sum(a != b for a, b in zip(noisy[1:], [again[s.key] for s in samples[1:]])) <= 1  # its first stays clean
    batch = fn.collate([fn(s) for s in samples[:8]])
    assert batch["caption_noisy"].dtype == torch.bool and batch["caption_noisy"].shape == (8,)
    plain = TrainSample(tok, ImageTransform(8, dtype="uint8"), seed=3, epoch=0)
    assert "caption_noisy" not in plain(samples[1]) and plain(samples[1])["caption"] == samples[1].caption
    with pytest.raises(ValueError, match="caption_noise"):
        TrainSample(tok, ImageTransform(8, dtype="uint8"), seed=3, epoch=0, caption_noise=1.0)
