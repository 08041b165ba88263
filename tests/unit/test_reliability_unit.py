"""Nothing lost, no silent wrong numbers (issue 18), without a run: every sample of a fuzzed
shard corpus is delivered or counted by reason (training and evaluation on that corpus, and the
preemption cases: tests/e2e/test_reliability.py)."""

from __future__ import annotations

from pathlib import Path

import torch


# ---------------------------------------------------------------- a fuzzed shard corpus
def _img(mode: str, fmt: str, size=(40, 30)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(mode) + len(fmt))
    if mode == "I;16":
        im = Image.fromarray((rng.integers(0, 65535, size[::-1])).astype("uint16"))
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3)).astype("uint8")).convert("P")
    else:
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3)).astype("uint8")).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _fuzz_corpus(root: Path) -> tuple[str, list[str], dict[str, int]]:
    """Shards of good and bad samples; returns (pattern, keys that must be delivered,
    skips that must be counted by reason). Samples a cut tar never held are not counted."""
    import json as _json

    from test_shards import _huge_header_jpeg, jpeg

    root.mkdir(parents=True, exist_ok=True)
    good_keys, skips = [], {}
    full = jpeg()

    def sample(key, **fields):
        return [(f"{key}.{ext}", data) for ext, data in fields.items()]

    def ok(key, image=None, ext="jpg"):
        good_keys.append(key)
        return sample(
            key, **{ext: image or full, "txt": f"a photo {key}".encode(), "json": _json.dumps({"lang": "en"}).encode()}
        )

    def bad(key, reason, **fields):
        skips[reason] = skips.get(reason, 0) + 1
        return sample(key, **fields)

    shard0 = (
        ok("a00")
        + ok("a01", _img("CMYK", "JPEG"))
        + ok("a02", _img("I;16", "PNG"), "png")
        + ok("a03", _img("P", "PNG"), "png")
        + ok("a04", _img("RGB", "PNG"), "jpg")  # png bytes named .jpg
        + bad("a05", "bad_image", jpg=full[: len(full) // 3], txt=b"x")
        + bad("a06", "bad_image", jpg=b"", txt=b"x")
        + bad("a07", "bad_image", jpg=b"not an image", txt=b"x")
        + bad("a08", "too_large", jpg=_huge_header_jpeg(9000, 9000), txt=b"x")
        + bad("a09", "too_large", jpg=_huge_header_jpeg(60000, 60000), txt=b"x")
        + bad("a10", "bad_caption", jpg=full, txt=b"caf\xe9 \xff")
        + bad("a11", "empty_caption", jpg=full, txt=b"  ")
        + bad("a12", "missing_caption", jpg=full, json=b"{}")
        + bad("a13", "missing_image", txt=b"caption only")
        + bad("a14", "bad_json", jpg=full, txt=b"x", json=b"{oops")
        + ok("a15")
    )
    _write_tar(root / "f000.tar", shard0)
    # a duplicated member: only that sample is lost
    dup = ok("b00") + ok("b01") + bad("b02", "duplicate_member", jpg=full, txt=b"x") + [("b02.jpg", full)] + ok("b03")
    _write_tar(root / "f001.tar", dup)
    # a tar cut inside the data of its last sample's image: the complete ones before it are kept
    _write_tar(root / "f002.tar", ok("c00") + ok("c01") + [("c02.txt", b"cut"), ("c02.jpg", full)])
    data = (root / "f002.tar").read_bytes()
    cut = data.rindex(full[:64]) + len(full) // 2  # inside c02.jpg's data (the last image written)
    (root / "f002.tar").write_bytes(data[:cut])
    skips["truncated_sample"] = 1
    # a zero-byte tar and a file that is not a tar at all
    (root / "f003.tar").write_bytes(b"")
    (root / "f004.tar").write_bytes(b"this is not a tar archive" * 40)
    skips["bad_shard"] = 2 + 1  # the two, and the cut one
    return str(root / "f{000..004}.tar"), good_keys, skips


def test_every_sample_of_a_fuzzed_corpus_is_delivered_or_counted(tmp_path):
    """Evaluation reads every shard once: each written sample is delivered or counted by
    reason, and the counts sum to the samples written. Before: a duplicated member lost the
    rest of its shard, a cut tar lost the complete sample before the cut, and the eval
    loader's counts of a shard's last skips never arrived (no later batch carried them)."""
    import numpy as np

    from siglip2.data.shards import SkipStats, build_eval_loader

    def sample_fn(s):
        return {"image": torch.from_numpy(np.array(s.image.resize((16, 16)), dtype=np.uint8)).permute(2, 0, 1)}

    pattern, good_keys, skips = _fuzz_corpus(tmp_path / "fuzz")
    for workers in (0, 2):
        stats, keys = SkipStats(), []
        for batch in build_eval_loader(pattern, sample_fn, batch_size=4, num_workers=workers, max_pixels=10_000_000):
            stats.update(batch)
            keys += batch.get("key", [])
        assert sorted(keys) == sorted(good_keys), workers
        assert stats.totals() == skips, workers
    written = len(good_keys) + sum(n for r, n in skips.items() if r != "bad_shard")
    assert len(keys) + sum(n for r, n in stats.totals().items() if r != "bad_shard") == written
