"""Shard pipeline: round trip, rank/worker splits, mixing, bad data, no unpickling."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import time
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from siglip2.data import shards as S
from siglip2.data.shards import SkipStats, build_eval_loader, build_train_loader, decode_sample, expand_urls


# ---------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(color=(200, 30, 60), size=32) -> bytes:
    return encode(Image.new("RGB", (size, size), color), "JPEG", quality=95)


def good(key: str, caption: str | None = None, **meta) -> dict:
    return {
        "__key__": key,
        "jpg": jpeg(),
        "txt": (caption or f"caption {key}").encode(),
        "json": json.dumps({"id": key, **meta}).encode(),
    }


def write_shard(path, samples) -> str:
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return str(path)


def make_shards(root, n_shards, per_shard, prefix="s", **meta) -> list[str]:
    os.makedirs(root, exist_ok=True)
    return [
        write_shard(
            os.path.join(root, f"{prefix}{i:05d}.tar"),
            [good(f"{prefix}{i:05d}_{j:03d}", **meta) for j in range(per_shard)],
        )
        for i in range(n_shards)
    ]


def sample_fn(s):
    x = torch.from_numpy(np.array(s.image, dtype=np.uint8)).permute(2, 0, 1)
    return {"image": x, "caption": s.caption, "lang": s.meta.get("lang", "")}


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def set_rank(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


# ---------------------------------------------------------------------------- round trip


def test_round_trip_eval(tmp_path):
    urls = make_shards(tmp_path, 2, 5)
    pattern = str(tmp_path / "s{00000..00001}.tar")
    batches = list(build_eval_loader(pattern, sample_fn, batch_size=4, num_workers=0))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(f"s{i:05d}_{j:03d}" for i in range(2) for j in range(5))
    assert [len(b["key"]) for b in batches] == [4, 4, 2]  # one worker: partial last batch
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.uint8
    # JPEG of a flat colour comes back within a few levels of it
    assert (b["image"][:, 0].float().mean() - 200).abs() < 4
    assert b["caption"] == [f"caption {k}" for k in b["key"]]
    assert b["skipped"] == {} and b["worker_id"] == 0
    assert expand_urls(pattern) == urls


def test_decoded_sample_fields_and_mask(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:10, 5:20] = 3
    s = good("k0")
    s["seg.png"] = encode(Image.fromarray(mask), "PNG")
    write_shard(tmp_path / "m.tar", [s])
    seen = []
    loader = build_eval_loader(
        str(tmp_path / "m.tar"), lambda d: seen.append(d) or {"x": 1}, batch_size=1, num_workers=0, decode_mask=True
    )
    assert len(list(loader)) == 1
    d = seen[0]
    assert isinstance(d, S.DecodedSample)
    assert d.key == "k0" and d.caption == "caption k0" and d.meta == {"id": "k0"}
    assert d.image.mode == "RGB" and d.image.size == (32, 32)
    np.testing.assert_array_equal(d.mask, mask)


def test_image_modes_become_rgb(tmp_path):
    # palette with a transparent index: transparent pixels composite over white
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0] + [0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    p.info["transparency"] = 1
    rgba = Image.new("RGBA", (8, 8), (0, 128, 0, 0))  # fully transparent green
    rgba.paste((0, 128, 0, 255), (0, 0, 4, 8))
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # = red
    gray = Image.new("L", (8, 8), 77)
    la = Image.new("LA", (8, 8), (0, 0))
    i16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    cases = {
        "pal": (encode(p, "PNG", transparency=1), "png", [(6, 0, (255, 0, 0)), (1, 0, (255, 255, 255))]),
        "rgba": (encode(rgba, "PNG"), "png", [(1, 0, (0, 128, 0)), (6, 0, (255, 255, 255))]),
        "cmyk": (encode(cmyk, "JPEG", quality=100), "jpg", [(3, 3, (255, 0, 0))]),
        "gray": (encode(gray, "PNG"), "png", [(3, 3, (77, 77, 77))]),
        "la": (encode(la, "PNG"), "png", [(3, 3, (255, 255, 255))]),
        "i16": (encode(i16, "PNG"), "png", [(3, 3, (255, 255, 255))]),
        "webp": (
            encode(Image.new("RGB", (8, 8), (10, 200, 30)), "WEBP", lossless=True),
            "webp",
            [(3, 3, (10, 200, 30))],
        ),
    }
    for name, (data, ext, checks) in cases.items():
        d = decode_sample({"__key__": name, ext: data, "txt": b"x"})
        assert d.image.mode == "RGB", name
        for x, y, rgb in checks:
            got = d.image.getpixel((x, y))
            assert max(abs(a - b) for a, b in zip(got, rgb)) <= 3, (name, got, rgb)


# ---------------------------------------------------------------------------- splits


def test_eval_two_ranks_two_workers_each_sample_once(tmp_path, monkeypatch):
    make_shards(tmp_path, 7, 3)
    pattern = str(tmp_path / "s{00000..00006}.tar")
    seen = []
    for rank in range(2):
        set_rank(monkeypatch, rank, 2)
        seen.append(keys_of(build_eval_loader(pattern, sample_fn, batch_size=2, num_workers=2)))
    everything = [f"s{i:05d}_{j:03d}" for i in range(7) for j in range(3)]
    assert sorted(seen[0] + seen[1]) == sorted(everything)  # union, no duplicates
    assert not set(seen[0]) & set(seen[1])
    # rank 0 gets shards 0,2,4,6; rank 1 gets 1,3,5
    assert {k[:6] for k in seen[1]} == {"s00001", "s00003", "s00005"}


def test_train_two_ranks_two_workers_same_batch_count(tmp_path, monkeypatch):
    make_shards(tmp_path, 8, 4)
    pattern = str(tmp_path / "s{00000..00007}.tar")
    per_rank = []
    for rank in range(2):
        set_rank(monkeypatch, rank, 2)
        loader = build_train_loader(
            pattern, sample_fn, batch_size=3, num_batches=5, seed=1, num_workers=2, shuffle_buffer=10
        )
        assert len(loader) == 5
        epochs = [list(loader) for _ in range(2)]
        for ep in epochs:
            assert len(ep) == 5 and all(len(b["key"]) == 3 for b in ep)
            assert sorted({b["worker_id"] for b in ep}) == [0, 1]
        k1, k2 = [[k for b in ep for k in b["key"]] for ep in epochs]
        assert k1 != k2  # a new epoch is a new draw
        per_rank.append(set(k1 + k2))
    # 8 shards >= 2 ranks x 2 workers: each (rank, worker) resamples its own shards
    assert not per_rank[0] & per_rank[1]


def test_train_is_deterministic_given_seed(tmp_path):
    pattern = make_shards(tmp_path, 3, 4)

    def first_keys(seed):
        loader = build_train_loader(
            pattern, sample_fn, batch_size=4, num_batches=3, seed=seed, num_workers=0, shuffle_buffer=8
        )
        return keys_of(loader)

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(1)


def test_mix_by_weight(tmp_path):
    en = make_shards(tmp_path / "en", 3, 20, prefix="en", lang="en")
    xx = make_shards(tmp_path / "xx", 3, 20, prefix="xx", lang="xx")
    loader = build_train_loader(
        [{"urls": en, "weight": 0.9}, {"urls": xx, "weight": 0.1}],
        sample_fn,
        batch_size=25,
        num_batches=24,
        seed=3,
        num_workers=0,
        shuffle_buffer=20,
    )
    langs = Counter(lang for b in loader for lang in b["lang"])
    n = sum(langs.values())
    assert n == 600
    # binomial sd at p=0.1, n=600 is 0.012; allow ~3.5 sd
    assert abs(langs["xx"] / n - 0.1) < 0.045, langs


# ---------------------------------------------------------------------------- bad data


def _huge_header_jpeg(w: int, h: int) -> bytes:
    """A 32x32 JPEG whose SOF header claims w x h: only a header check sees that size."""
    data = bytearray(jpeg())
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 7] = h.to_bytes(2, "big")
    data[i + 7 : i + 9] = w.to_bytes(2, "big")
    return bytes(data)


def test_bad_samples_skipped_and_counted(tmp_path, caplog):
    full = jpeg()
    bad = {
        "truncated": ({"jpg": full[: len(full) // 2], "txt": b"x"}, "bad_image"),
        "zerobyte": ({"jpg": b"", "txt": b"x"}, "bad_image"),
        "notimage": ({"png": b"this is not a png at all", "txt": b"x"}, "bad_image"),
        "empty": ({"jpg": full, "txt": b""}, "empty_caption"),
        "blank": ({"jpg": full, "txt": b"  \n\t"}, "empty_caption"),
        "latin1": ({"jpg": full, "txt": "caf\xe9".encode("latin-1")}, "bad_caption"),
        "nocap": ({"jpg": full, "json": b"{}"}, "missing_caption"),
        "noimg": ({"txt": b"a caption", "json": b"{}"}, "missing_image"),
        "badjson": ({"jpg": full, "txt": b"x", "json": b"{not json"}, "bad_json"),
        "listjson": ({"jpg": full, "txt": b"x", "json": b"[1, 2]"}, "bad_json"),
        "big": ({"jpg": _huge_header_jpeg(5000, 5000), "txt": b"x"}, "too_large"),
        "bomb": ({"jpg": _huge_header_jpeg(30000, 30000), "txt": b"x"}, "too_large"),
        "badmask": ({"jpg": full, "txt": b"x", "seg.png": b"garbage"}, "bad_mask"),
        "dropme": ({"jpg": full, "txt": b"drop me"}, "sample_fn"),
    }
    samples = []
    for i, (name, (fields, _)) in enumerate(bad.items()):
        samples.append(good(f"g{i:02d}"))
        samples.append({"__key__": f"b{i:02d}_{name}", **fields})
    write_shard(tmp_path / "bad.tar", samples)

    def fn(s):
        return None if s.caption == "drop me" else sample_fn(s)

    stats = SkipStats()
    keys = []
    with caplog.at_level(logging.WARNING, logger="siglip2.data.shards"):
        for b in build_eval_loader(
            str(tmp_path / "bad.tar"), fn, batch_size=4, num_workers=0, decode_mask=True, max_pixels=1_000_000
        ):
            stats.update(b)
            keys += b["key"]
    assert sorted(keys) == [f"g{i:02d}" for i in range(len(bad))]
    assert stats.totals() == dict(Counter(reason for _, reason in bad.values()))
    assert any("too_large" in r.getMessage() for r in caplog.records)


def test_keys_with_dots_are_read_and_samples_of_other_members_counted(tmp_path):
    """Keys made from file names keep their dots (`photo.v3.jpg` is sample `photo.v3`, not
    `photo` with a `v3.jpg` member we never read: webdataset #237), and a sample of members we
    do not decode is counted, never lost silently (issue 27)."""
    import tarfile

    from siglip2.data.shards import split_member

    assert split_member("photo.v3.jpg") == ("photo.v3", "jpg")
    assert split_member("dir.a/IMG_1.final.JPEG") == ("dir.a/IMG_1.final", "jpeg")
    assert split_member("k.v2.seg.png") == ("k.v2", "seg.png") and split_member("k.png") == ("k", "png")
    assert split_member("k.v2.cls") == ("k.v2", None)
    members = [
        ("photo.v3.jpg", jpeg()),
        ("photo.v3.txt", b"dotted one"),
        ("photo.v3.json", b"{}"),
        ("IMG_0001.final.edit.jpg", jpeg()),
        ("IMG_0001.final.edit.txt", b"dotted two"),
        ("plain.jpg", jpeg()),
        ("plain.txt", b"plain"),
        ("plain.extra.bin", b"\0"),
        ("only.cls", b"3"),
        ("only.npy", b"\0"),  # nothing we decode: counted
        ("a.b.c.cls", b"1"),
        ("a.b.c.jpg", jpeg()),
        ("a.b.c.txt", b"unread member first"),
    ]
    with tarfile.open(tmp_path / "dots.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats, got = SkipStats(), {}
    for b in build_eval_loader(str(tmp_path / "dots.tar"), sample_fn, batch_size=2, num_workers=0):
        stats.update(b)
        got.update(dict(zip(b.get("key", []), b.get("caption", []))))
    assert got == {
        "photo.v3": "dotted one",
        "IMG_0001.final.edit": "dotted two",
        "plain": "plain",
        "a.b.c": "unread member first",
    }
    assert stats.totals() == {"no_known_member": 1}


def test_a_tar_not_grouped_by_sample_is_counted_and_named(tmp_path, caplog):
    """`tar cf x.tar *.jpg *.txt` puts every image before every caption: no sample is whole.
    Each part is counted (the images as missing_caption, the captions met again as
    split_sample), and one warning names the shard and the fix."""
    import logging
    import tarfile

    names = [f"k{i}" for i in range(4)]
    with tarfile.open(tmp_path / "sorted_by_ext.tar", "w") as tar:
        for ext, make in (("jpg", lambda k: jpeg()), ("txt", lambda k: f"caption {k}".encode())):
            for k in names:
                data = make(k)
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = SkipStats()
    with caplog.at_level(logging.WARNING):
        keys = []
        for b in build_eval_loader(str(tmp_path / "sorted_by_ext.tar"), sample_fn, batch_size=2, num_workers=0):
            stats.update(b)
            keys += b.get("key", [])
    assert keys == [] and stats.totals() == {"missing_caption": 4, "split_sample": 4}
    warned = [r.getMessage() for r in caplog.records if "not grouped by sample" in r.getMessage()]
    assert len(warned) == 1 and "sorted_by_ext.tar" in warned[0]


def test_corrupt_and_garbage_tars_skipped_with_warning(tmp_path, caplog):
    urls = make_shards(tmp_path, 3, 6)
    with open(urls[1], "rb") as f:
        data = f.read()
    with open(urls[1], "wb") as f:
        f.write(data[: len(data) // 2 + 100])  # cut in the middle of a member
    with open(tmp_path / "s00003.tar", "wb") as f:
        f.write(os.urandom(3000))
    pattern = str(tmp_path / "s{00000..00003}.tar")
    stats = SkipStats()
    keys = []
    with caplog.at_level(logging.WARNING, logger="siglip2.data.shards"):
        for b in build_eval_loader(pattern, sample_fn, batch_size=4, num_workers=0):
            stats.update(b)
            keys += b["key"]
    intact = {f"s{i:05d}_{j:03d}" for i in (0, 2) for j in range(6)}
    assert intact <= set(keys) and len(keys) == len(set(keys))
    assert stats.totals().get("bad_shard") == 2
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "s00001.tar" in msgs and "s00003.tar" in msgs


def test_train_stream_survives_bad_shard(tmp_path):
    urls = make_shards(tmp_path, 2, 4)
    (tmp_path / "bad.tar").write_bytes(b"\0" * 10)
    loader = build_train_loader(
        urls + [str(tmp_path / "bad.tar")], sample_fn, batch_size=4, num_batches=6, num_workers=0, shuffle_buffer=4
    )
    stats = SkipStats()
    n = 0
    for b in loader:
        stats.update(b)
        n += 1
    assert n == 6 and stats.totals().get("bad_shard", 0) >= 1


def test_train_stream_with_only_bad_shards_fails_loudly(tmp_path, monkeypatch):
    (tmp_path / "bad.tar").write_bytes(b"garbage")
    monkeypatch.setattr(S, "MAX_CONSECUTIVE_EMPTY_SHARDS", 5)
    loader = build_train_loader(str(tmp_path / "bad.tar"), sample_fn, batch_size=2, num_batches=2, num_workers=0)
    with pytest.raises(RuntimeError, match="no sample"):
        list(loader)


def test_missing_pattern_raises_at_build(tmp_path):
    make_shards(tmp_path, 1, 1)
    missing = str(tmp_path / "nope-{000..009}.tar")
    with pytest.raises(FileNotFoundError, match="nope-"):
        build_train_loader(missing, sample_fn, batch_size=1, num_batches=1)
    with pytest.raises(FileNotFoundError, match="nope-"):
        build_eval_loader([str(tmp_path / "s00000.tar"), missing], sample_fn, batch_size=1)
    with pytest.raises(FileNotFoundError, match="nope-"):
        build_train_loader(
            [{"urls": str(tmp_path / "s00000.tar"), "weight": 0.9}, {"urls": missing, "weight": 0.1}], sample_fn, 1, 1
        )
    with pytest.raises(FileNotFoundError):
        expand_urls(str(tmp_path / "*.tgz"))


def test_url_forms(tmp_path):
    urls = make_shards(tmp_path, 3, 2)
    assert expand_urls(str(tmp_path)) == urls  # a folder of shards
    assert expand_urls(str(tmp_path / "s*.tar")) == urls
    assert expand_urls([urls[0], str(tmp_path / "s{00001..00002}.tar")]) == urls
    assert expand_urls(f"{urls[0]}::{urls[1]}") == urls[:2]
    # pipe: URLs go through webdataset's opener
    loader = build_eval_loader(f"pipe:cat {urls[2]}", sample_fn, batch_size=8, num_workers=0)
    assert keys_of(loader) == ["s00002_000", "s00002_001"]


# ---------------------------------------------------------------------------- no pickle


class _Bomb:
    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise AssertionError("a shard member was unpickled")


def test_pickle_members_never_loaded(tmp_path, monkeypatch):
    s = good("p0")
    s["pyd"] = pickle.dumps(_Bomb())
    s["pickle"] = pickle.dumps(_Bomb())
    write_shard(tmp_path / "p.tar", [s, good("p1")])
    # the member really is a bomb
    with pytest.raises(AssertionError):
        pickle.loads(s["pyd"])

    def refuse(*a, **k):
        raise AssertionError("pickle used while reading shards")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    seen = []
    loader = build_eval_loader(
        str(tmp_path / "p.tar"), lambda d: seen.append(d) or sample_fn(d), batch_size=2, num_workers=0
    )
    batches = list(loader)
    assert batches[0]["key"] == ["p0", "p1"] and set(batches[0]) == {
        "image",
        "caption",
        "lang",
        "key",
        "skipped",
        "worker_id",
    }
    assert all(set(vars(d)) == {"key", "image", "caption", "meta", "mask"} for d in seen)


def test_eps_is_never_opened(monkeypatch):
    """PIL would hand EPS to Ghostscript: shard bytes never reach that plugin."""
    from PIL import EpsImagePlugin

    called = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: called.append(1))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(S.BadSample) as e:
        decode_sample({"__key__": "e", "jpg": eps, "txt": b"x"})
    assert e.value.reason == "bad_image" and not called


# ---------------------------------------------------------------------------- stats


def test_skipstats_folds_workers_and_restarts():
    st = SkipStats()
    st.update({"skipped": {"bad_image": 1}, "worker_id": 0})
    st.update({"skipped": {"bad_image": 2, "bad_json": 1}, "worker_id": 0})
    st.update({"skipped": {"bad_image": 5}, "worker_id": 1})
    assert st.totals() == {"bad_image": 7, "bad_json": 1}
    st.update({"skipped": {"bad_image": 1}, "worker_id": 0})  # worker 0 restarted
    assert st.totals() == {"bad_image": 8, "bad_json": 1}


# ---------------------------------------------------------------------------- speed


def test_throughput_one_worker(tmp_path, capsys):
    """Prints samples/s of decode + 224px transform in one worker (a figure, not a bar)."""
    from siglip2.data.transforms import ImageTransform

    rng = np.random.default_rng(0)
    n_shards, per = 3, 100
    for i in range(n_shards):
        write_shard(
            tmp_path / f"t{i}.tar",
            [
                {
                    "__key__": f"t{i}_{j:03d}",
                    "txt": b"a photo",
                    "jpg": encode(Image.fromarray(rng.integers(0, 255, (128, 128, 3), np.uint8)), "JPEG", quality=90),
                }
                for j in range(per)
            ],
        )
    tf = ImageTransform(224, random_resized_crop=True, hflip=True)

    def rate(fn):
        loader = build_eval_loader(str(tmp_path / "t{0..2}.tar"), fn, batch_size=50, num_workers=1)
        it = iter(loader)
        first = next(it)  # worker start-up is not throughput
        t0 = time.perf_counter()
        n = sum(len(b["key"]) for b in it)
        dt = time.perf_counter() - t0
        assert n + len(first["key"]) == n_shards * per
        return n / dt

    full = rate(lambda s: {"image": tf(s.image)[0]})
    decode_only = rate(lambda s: {"size": s.image.size})
    with capsys.disabled():
        print(
            f"\n[throughput] 1 worker, 128px JPEG: decode only {decode_only:.0f} samples/s; "
            f"decode + 224px RRC/flip/[-1,1] {full:.0f} samples/s"
        )


# ---------------------------------------------------------------------------- decode size, collate


def test_decode_size_lets_large_jpegs_decode_smaller_but_never_below_it():
    rng = np.random.default_rng(0)
    big = encode(Image.fromarray(rng.integers(0, 255, (300, 420, 3), np.uint8)), "JPEG", quality=90)
    raw = {"__key__": "k", "jpg": big, "txt": b"a photo"}
    assert decode_sample(raw).image.size == (420, 300)
    small = decode_sample(raw, decode_size=(64, 64)).image
    assert small.mode == "RGB" and 64 <= min(small.size) < 300 and small.size == (105, 75)  # 1/4 scale
    assert decode_sample(raw, decode_size=(224, 224)).image.size == (420, 300)  # 1/2 would be < 224
    png = {"__key__": "p", "png": encode(Image.new("RGB", (400, 400)), "PNG"), "txt": b"x"}
    assert decode_sample(png, decode_size=(64, 64)).image.size == (400, 400)  # JPEG only
    # a mask must match the full image, so no reduced decode with masks
    mask = {**raw, "seg.png": encode(Image.new("L", (420, 300)), "PNG")}
    assert decode_sample(mask, decode_mask=True, decode_size=(64, 64)).image.size == (420, 300)


def test_collate_in_a_worker_stacks_into_shared_memory():
    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield S.collate(
                [{"x": torch.full((2, 3), float(i)), "k": f"k{i}", "v": torch.tensor(i > 0)} for i in range(3)]
            )

    batch = next(iter(torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=1)))
    assert batch["x"].is_shared() and batch["x"].shape == (3, 2, 3)
    assert batch["x"][:, 0, 0].tolist() == [0.0, 1.0, 2.0] and batch["v"].tolist() == [False, True, True]
    assert batch["k"] == ["k0", "k1", "k2"]
    assert not S.collate([{"x": torch.zeros(2)}])["x"].is_shared()  # main process: plain stack
