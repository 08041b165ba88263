"""WebDataset shard pipeline: img2dataset-style shards in, collated batch dicts out.

Why it looks the way it does:
- Training streams are *resampled* (shards drawn with replacement, seeded per run, rank,
  worker and epoch) and cut to exactly ``num_batches`` batches per rank. Every DDP rank
  therefore takes the same number of steps and no rank ever waits on another at an
  all-reduce; there is no "end of data" to synchronise.
- Evaluation streams read every shard once, split by rank then by worker, so every sample
  is seen exactly once across the whole job. Ranks may get different numbers of batches
  (shards are the unit of splitting), so gather eval results rather than step in lockstep.
- Only the keys we know are decoded, by our own code with PIL and json
  (:mod:`siglip2.data.decode`, which also holds the image mode policy). Nothing from a
  shard is ever unpickled: ``.pyd``/``.pickle``/``.pth``/... members are not even read
  out of the tar.
- Bad data never stops a run: a bad sample is skipped and counted by reason, a bad shard is
  skipped with a warning naming it. The counts travel with every batch (``skipped``,
  ``worker_id``) because DataLoader workers are separate processes; :class:`SkipStats`
  folds them in the main process. One :class:`SkipStats` per loader (worker ids repeat
  across loaders).

Skip reasons (keys of ``batch["skipped"]``): see :data:`SKIP_REASONS`. A ``sample_fn`` skips
a sample by returning None (reason "sample_fn") or by raising ``BadSample(reason)`` for a
reason of its own; any other exception from it is a bug and propagates. A reason that starts
with ``filtered_`` (:data:`FILTER_PREFIX`) is a sample left out on purpose (an eval subset's
aspect filter, a balance table): counted like the others, but not warned about per sample.

Rank and world size come from ``torch.distributed`` when it is initialised, else from the
``RANK``/``WORLD_SIZE`` environment variables, else 0/1; they are read when the loader is
built (Lightning builds loaders after the process group is up).
"""

from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from typing import Any
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.utils import make_seed

# Decoding lives in siglip2.data.decode; its public names are re-exported here (unchanged API).
from siglip2.data.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_KEYS,
    JSON_KEY,
    MASK_KEY,
    TEXT_KEY,
    BadSample,
    DecodedSample,
    decode_sample,
    to_rgb,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DecodedSample",
    "BadSample",
    "SkipStats",
    "SKIP_REASONS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_KEYS",
    "build_train_loader",
    "build_eval_loader",
    "expand_urls",
    "decode_sample",
    "to_rgb",
    "collate",
    "get_rank_world",
    "read_shards",
    "KeyFilter",
    "shard_name",
]

# Only members with one of these keys are read out of the tar (see split_member).
_WANTED_KEYS = frozenset(IMAGE_KEYS + (TEXT_KEY, JSON_KEY, MASK_KEY))
_WANTED_LONGEST_FIRST = tuple(sorted(_WANTED_KEYS, key=len, reverse=True))  # "seg.png" before "png"

SKIP_REASONS = {
    "bad_shard": "tar could not be opened or read to the end (samples after the fault lost)",
    "missing_image": "no jpg/jpeg/png/webp member",
    "missing_caption": "no txt member",
    "empty_caption": "caption empty or whitespace only",
    "bad_caption": "caption is not valid UTF-8",
    "bad_image": "zero-byte, truncated or undecodable image",
    "too_large": "width*height above max_pixels (checked from the header) or a PIL bomb",
    "bad_json": "json member not a valid JSON object",
    "bad_mask": "seg.png undecodable or not the image's size (decode_mask=True only)",
    "sample_fn": "the user's sample_fn returned None",
    "duplicate_member": "a member name twice in one sample (the sample is skipped, the shard's others kept)",
    "truncated_sample": "the tar ends inside this sample (its earlier samples are kept)",
    "no_known_member": "no member this reader decodes (jpg/jpeg/png/webp, txt, json, seg.png)",
    "split_sample": "a key met again after other keys: its members are not next to each other in the tar "
    "(its first part is counted under its own reason, e.g. missing_caption)",
}

FILTER_PREFIX = "filtered_"  # reasons for samples left out on purpose, not bad data


def is_filter_reason(reason: str) -> bool:
    """True for a skip reason that names a deliberate filter (``filtered_*``), not bad data."""
    return reason.startswith(FILTER_PREFIX)


# A resampled stream over shards that never yield a usable sample would spin forever;
# fail loudly instead. Generous: a real dataset with a few bad shards never gets close.
MAX_CONSECUTIVE_EMPTY_SHARDS = 200
MAX_CONSECUTIVE_SKIPS = 100_000


# ----------------------------------------------------------------------------------------
# urls
# ----------------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_urls(urls) -> list[str]:
    """Brace patterns, ``::``-joined strings, lists of either, local globs and folders.

    Local patterns are checked *now*: a pattern that matches no existing shard raises
    FileNotFoundError naming it, so a typo fails before training starts. Remote URLs
    (``pipe:``, ``s3://``, ``http://``, ...) are passed through unchecked.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = [os.fspath(urls)]
    elif isinstance(urls, dict):
        raise TypeError("expand_urls takes a pattern or a list of patterns, not a source dict")
    out: list[str] = []
    for pattern in urls:
        pattern = os.fspath(pattern)
        expanded = _wds_expand_urls(pattern)  # '::' split, ${VAR}, braces
        if not all(_is_local(u) for u in expanded):
            out.extend(expanded)
            continue
        found: list[str] = []
        missing: list[str] = []
        for u in expanded:
            p = os.path.expanduser(_local_path(u))
            if any(c in p for c in "*?["):
                found.extend(sorted(glob.glob(p)))
            elif os.path.isdir(p):
                found.extend(sorted(glob.glob(os.path.join(p, "*.tar"))))
            elif os.path.isfile(p):
                found.append(p)
            else:
                missing.append(u)
        if not found:
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        if missing:
            logger.warning(
                "%d of %d shards of %r do not exist and are left out, e.g. %s",
                len(missing),
                len(expanded),
                pattern,
                missing[:3],
            )
        out.extend(found)
    if not out:
        raise FileNotFoundError(f"no shard matches {urls!r}")
    return out


def _open_url(url: str):
    """wds.gopen for the schemes it knows (local, pipe:, http, gs, hf...), else fsspec."""
    scheme = urlparse(url).scheme
    if _is_local(url) or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec  # s3://, az://, ... whatever fsspec has a backend for

    return fsspec.open(url, "rb").open()


def get_rank_world() -> tuple[int, int]:
    """(rank, world_size): torch.distributed if initialised, else RANK/WORLD_SIZE, else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------------
# skip accounting
# ----------------------------------------------------------------------------------------


class _WorkerStats:
    """Per-worker skip counts, plus warnings at a low rate (count 1, 10, 100, ...)."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._warned_shards: set[str] = set()

    def skip(self, reason: str, key: str = "", url: str = "", detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if _is_power_of_ten(n) and not is_filter_reason(reason):
            logger.warning(
                "skipped sample %r from %s: %s%s (%d so far for this reason in this worker)",
                key,
                url,
                reason,
                f" ({detail})" if detail else "",
                n,
            )

    def bad_shard(self, url: str, exn: BaseException) -> None:
        self.counts["bad_shard"] += 1
        if url not in self._warned_shards:  # resampled streams revisit the same shard
            self._warned_shards.add(url)
            logger.warning("skipping unreadable shard %s: %s: %s", url, type(exn).__name__, exn)


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


class SkipStats:
    """Folds the per-worker cumulative ``skipped`` counts that ride on batches.

    Each batch carries its worker's running totals, so the latest batch of every worker is
    enough; a worker restarted (non-persistent workers, new epoch) starts again from zero,
    which is noticed as a count going down and the old totals are banked.
    """

    def __init__(self):
        self._latest: dict[int, dict[str, int]] = {}
        self._banked: Counter[str] = Counter()

    def update(self, batch: dict) -> None:
        skipped = batch.get("skipped")
        if skipped is None:
            return
        wid = int(batch.get("worker_id", 0))
        prev = self._latest.get(wid)
        if prev is not None and any(skipped.get(k, 0) < v for k, v in prev.items()):
            self._banked.update(prev)
        self._latest[wid] = dict(skipped)

    def totals(self) -> dict[str, int]:
        out = Counter(self._banked)
        for counts in self._latest.values():
            out.update(counts)
        return {k: v for k, v in out.items() if v}


# ----------------------------------------------------------------------------------------
# pipeline stages
# ----------------------------------------------------------------------------------------


def split_member(name: str) -> tuple[str, str | None]:
    """(sample key, extension) of a tar member. The extension is the longest of the ones we
    decode that the name ends with, case-insensitive ("seg.png" before "png"); the key is
    everything before it, dots and folders included, so keys made from file names keep their
    dots ("photo.v3.jpg" -> ("photo.v3", "jpg"), where webdataset's `base_plus_ext` splits at
    the first dot and loses the image: webdataset #237). A member we do not decode gives
    (name up to its last dot, None): it is never read, but its sample is seen and counted."""
    lower = name.lower()
    for ext in _WANTED_LONGEST_FIRST:
        key = name[: -len(ext) - 1]
        if lower.endswith("." + ext) and key and not key.endswith("/"):
            return key, ext
    base = name.rsplit("/", 1)[-1]
    return (name.rsplit(".", 1)[0] if "." in base.lstrip(".") else name), None


def _tag(files: Iterator[dict], url: str) -> Iterator[dict]:
    for f in files:
        f["__url__"] = url
        yield f


class _ShardFault(Exception):
    """The tar stream broke part-way (its cause is chained)."""


def _tar_samples(fileobj, url: str, stats: _WorkerStats) -> Iterator[dict]:
    """Raw samples of one tar stream, grouped by key (`split_member`: dotted keys kept,
    lower-case extensions), reading only the members we decode. A group of members of which
    we decode none is counted ("no_known_member"), never dropped silently.

    Faults are pinned on the sample they hit, never on the samples around it:
    - a member name seen twice in one sample: that sample is skipped ("duplicate_member");
    - the stream breaks inside a member's data: that member's sample is skipped
      ("truncated_sample"), every complete sample before it delivered;
    - the stream breaks in a header: the pending sample is delivered when it holds an image
      and a caption (its members were read whole), else skipped as truncated.
    Then `_ShardFault` is raised for the caller to count the shard.
    A key met again after other keys (a tar written as `tar cf x.tar *.jpg *.txt`, members
    not grouped by sample) is skipped as "split_sample", with one warning per shard naming it.
    """
    tar = tarfile.open(fileobj=fileobj, mode="r|*")
    current: dict | None = None
    duplicate = False
    seen: set[str] = set()  # keys of this shard's finished groups
    split = 0

    def finish():
        nonlocal split
        if current is None:
            return None
        if current["__key__"] in seen:
            split += 1
            if split == 1:
                logger.warning(
                    "shard %s: sample %r is met again after other samples: the tar's members are not "
                    "grouped by sample (written as `tar cf x.tar *.jpg *.txt`?), so each part is skipped "
                    "on its own (split_sample, missing_caption, ...). Write each sample's files next to "
                    "each other (tar of the files sorted by name, or webdataset's ShardWriter)",
                    url,
                    current["__key__"],
                )
            stats.skip("split_sample", current["__key__"], url)
            return None
        seen.add(current["__key__"])
        if duplicate:
            stats.skip("duplicate_member", current["__key__"], url)
            return None
        if len(current) == 2:  # only __key__ and __url__: members, none of them ours
            stats.skip("no_known_member", current["__key__"], url)
            return None
        return current

    members = iter(tar)
    while True:
        try:
            info = next(members)
        except StopIteration:
            break
        except Exception as exn:  # a header cut short or corrupt
            if current is not None and not duplicate and any(k in current for k in IMAGE_KEYS) and TEXT_KEY in current:
                yield current
            elif current is not None:
                stats.skip("duplicate_member" if duplicate else "truncated_sample", current["__key__"], url)
            raise _ShardFault(f"{type(exn).__name__}: {exn}") from exn
        if not info.isreg():
            continue
        key, ext = split_member(info.name)
        if (
            ext is None
            and current is not None
            and (key == current["__key__"] or info.name.startswith(current["__key__"] + "."))
        ):
            continue  # another member of the current sample that we do not read
        if current is None or key != current["__key__"]:
            done = finish()
            if done is not None:
                yield done
            current, duplicate = {"__key__": key, "__url__": url}, False
        if ext is None:
            continue  # the first member of a sample is one we do not read: the sample is seen
        if ext in current:
            duplicate = True
            continue
        try:
            current[ext] = tar.extractfile(info).read()
        except Exception as exn:  # the data of this member is cut short
            stats.skip("truncated_sample", key, url)
            raise _ShardFault(f"{type(exn).__name__}: {exn}") from exn
        tar.members = []  # a streaming read keeps no member list
    done = finish()
    if done is not None:
        yield done


def read_shards(
    shards: Iterable[dict], stats: _WorkerStats | None = None, max_empty: int | None = None
) -> Iterator[dict]:
    """Shard dicts -> raw samples, one shard at a time so a fault is pinned on its shard.

    ``shards``: dicts with a ``"url"`` (what ``wds.ResampledShards`` / ``SimpleShardList``
    yield), e.g. ``[{"url": u} for u in expand_urls(pattern)]``. Each raw sample is a dict
    ``{"__key__": str, "__url__": str, <ext>: bytes}`` holding only the members that
    :func:`siglip2.data.decode.decode_sample` reads (image, ``txt``, ``json``, ``seg.png``).

    A duplicated member skips its sample only, and a tar cut short loses only the sample it
    is cut in (`_tar_samples`); a shard that fails to open or breaks part-way is counted
    once as "bad_shard" in ``stats`` (a fresh counter when None) and warned about, and the
    stream goes on with the next shard. Raises RuntimeError after ``max_empty`` shards in a
    row gave no sample (None: never).
    """
    if stats is None:
        stats = _WorkerStats()
    empty_run = 0
    for shard in shards:
        url = shard["url"]
        n = 0
        stream = None
        try:
            stream = _open_url(url)
            for sample in _tar_samples(stream, url, stats):
                n += 1
                yield sample
        except Exception as exn:
            stats.bad_shard(url, exn.__cause__ or exn)
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:
                    pass
        empty_run = 0 if n else empty_run + 1
        if max_empty is not None and empty_run >= max_empty:
            raise RuntimeError(
                f"{empty_run} shards in a row gave no sample (last: {url}); skip counts so far: {dict(stats.counts)}"
            )


def shard_name(url: str) -> str:
    """A shard's name that survives moving the data: its folder and file name
    (``/data/en/00012.tar``, ``s3://bucket/en/00012.tar`` and ``pipe:aws s3 cp
    s3://bucket/en/00012.tar -`` are all ``en/00012.tar``); for ``pipe:`` the last word that
    holds ``.tar``."""
    if url.startswith("pipe:"):
        words = [w for w in url[5:].split() if ".tar" in w]
        url = words[-1] if words else url[5:]
    path = urlparse(url).path if "://" in url or url.startswith("file:") else url
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:])


class KeyFilter:
    """Samples left out on purpose by key, counted under `reason` (a ``filtered_*`` name):
    `keys` holds ``"<shard_name(url)>/<key>"`` strings (`siglip2.data.balance.table_key`)."""

    def __init__(self, keys: frozenset[str], reason: str):
        if not is_filter_reason(reason):
            raise ValueError(f"a key filter's reason must start with {FILTER_PREFIX!r}, got {reason!r}")
        self.keys, self.reason = frozenset(keys), reason

    def drops(self, url: str, key: str) -> bool:
        return f"{shard_name(url)}/{key}" in self.keys

    def shards(self) -> set[str]:
        """The shard names the filter's keys come from."""
        return {k.rsplit("/", 1)[0] for k in self.keys}


def _decode_stage(
    samples: Iterable[dict],
    stats: _WorkerStats,
    sample_fn: Callable,
    max_pixels: int,
    decode_mask: bool,
    max_skips: int | None = None,
    decode_size: tuple[int, int] | None = None,
    drop: KeyFilter | None = None,
) -> Iterator[dict]:
    run = 0
    for raw in samples:
        key, url = raw.get("__key__", ""), raw.get("__url__", "")
        if drop is not None and drop.drops(url, key):  # before decoding: a dropped image costs no decode
            stats.skip(drop.reason, key, url, "")
            run += 1  # a source the filter drops entirely must stop, not spin
            if max_skips is not None and run >= max_skips:
                raise RuntimeError(
                    f"{run} samples in a row were skipped or filtered; skip counts: {dict(stats.counts)}"
                )
            continue
        try:
            decoded = decode_sample(raw, max_pixels=max_pixels, decode_mask=decode_mask, decode_size=decode_size)
            out = sample_fn(decoded)  # exceptions here are bugs: let them surface
            if out is None:
                raise BadSample("sample_fn")
        except BadSample as s:
            stats.skip(s.reason, key, url, s.detail)
            run += 1
            if max_skips is not None and run >= max_skips:
                raise RuntimeError(f"{run} samples in a row were skipped; skip counts: {dict(stats.counts)}") from None
            continue
        run = 0
        if "key" not in out:
            out = {**out, "key": key}
        yield out


def _stack(vals: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; inside a DataLoader worker straight into shared memory, as torch's
    default_collate does: the batch then crosses to the main process without another copy
    (a 128 x 3 x 224 x 224 float batch is 77 MB)."""
    if get_worker_info() is None or vals[0].is_cuda or len({tuple(v.shape) for v in vals}) != 1:
        return torch.stack(vals)
    elem = vals[0]
    storage = elem.untyped_storage()._new_shared(len(vals) * elem.numel() * elem.element_size())
    out = elem.new_empty(0).set_(storage, 0, (len(vals), *elem.shape))
    return torch.stack(vals, out=out)


def collate(samples: list[dict]) -> dict:
    """Stack tensors, put everything else into lists (docs/INTERFACES.md)."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in vals):
            try:
                out[k] = _stack(vals)
            except RuntimeError as e:
                shapes = sorted({tuple(v.shape) for v in vals})
                raise ValueError(f"cannot stack batch key {k!r}: shapes {shapes}") from e
        else:
            out[k] = vals
    return out


def _batch_stage(
    samples: Iterable[dict],
    batch_size: int,
    stats: _WorkerStats,
    worker_id: int,
    partial_last: bool,
    trailer: bool = False,
    collate_fn: Callable[[list[dict]], dict] | None = None,
) -> Iterator[dict]:
    """Batches of `batch_size` made by `collate_fn` (default `collate`); `trailer`: when the
    stream ends with skips no batch has carried yet, one more batch with no samples (only
    `skipped` and `worker_id`) carries them."""
    buf: list[dict] = []
    sent: dict[str, int] | None = None
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            batch = _finish_batch(buf, stats, worker_id, collate_fn)
            sent = batch["skipped"]
            yield batch
            buf = []
    if buf and partial_last:
        batch = _finish_batch(buf, stats, worker_id, collate_fn)
        sent = batch["skipped"]
        yield batch
    if trailer and stats.counts and dict(stats.counts) != sent:
        yield _stamp({}, stats, worker_id)


def _finish_batch(
    buf: list[dict], stats: _WorkerStats, worker_id: int, collate_fn: Callable[[list[dict]], dict] | None = None
) -> dict:
    return _stamp((collate_fn or collate)(buf), stats, worker_id)


def sample_collate(sample_fn: Callable) -> Callable[[list[dict]], dict]:
    """The batch maker of a `sample_fn`: its `collate` method when it has one (e.g.
    `siglip2.data.samples.TrainSample`, which tokenises per batch), else `collate`."""
    return getattr(sample_fn, "collate", collate)


def _stamp(batch: dict, stats: _WorkerStats, worker_id: int) -> dict:
    """A made batch carries the worker's skip counts so far and the worker id."""
    batch["skipped"] = dict(stats.counts)
    batch["worker_id"] = worker_id
    return batch


def _split_by_rank(src: Iterable, rank: int, world: int) -> Iterator:
    """Like wds.split_by_node, but with the rank fixed when the loader was built."""
    return islice(src, rank, None, world)


def _weighted_mix(streams: list[Iterator], weights: list[float], rng: random.Random):
    """Seeded version of wds.RandomMix over infinite streams."""
    if len(streams) == 1:
        yield from streams[0]
        return
    idx = list(range(len(streams)))
    while True:
        i = rng.choices(idx, weights=weights)[0]
        yield next(streams[i])


# ----------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------


def _normalise_sources(sources) -> list[tuple[list[str], float]]:
    if isinstance(sources, (str, os.PathLike)):
        return [(expand_urls(sources), 1.0)]
    if hasattr(sources, "keys"):  # a single {"urls": ..., "weight": ...}
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("no data sources given")
    if all(isinstance(s, dict) or hasattr(s, "keys") for s in sources):
        out = []
        for s in sources:
            if "urls" not in s:
                raise ValueError(f"source {dict(s)!r} has no 'urls'")
            w = float(s.get("weight", 1.0))
            if not w > 0:
                raise ValueError(f"source weight must be > 0, got {w} for {s['urls']!r}")
            urls = s["urls"]
            out.append((expand_urls(urls if isinstance(urls, str) else list(urls)), w))
        return out
    return [(expand_urls(sources), 1.0)]


class _TrainStream(IterableDataset):
    """Infinite resampled mix, cut to this worker's share of ``num_batches``."""

    def __init__(
        self,
        sources,
        sample_fn,
        batch_size,
        num_batches,
        seed,
        rank,
        world,
        shuffle_buffer,
        max_pixels,
        decode_mask,
        reseed_each_iter=True,
        decode_size=None,
        batcher=None,
        drop=None,
    ):
        super().__init__()
        self.drop = drop
        self.batcher = batcher
        self.reseed_each_iter = reseed_each_iter
        self.decode_size = decode_size
        self.sources = sources
        self.sample_fn = sample_fn
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.rank, self.world = rank, world
        self.shuffle_buffer = shuffle_buffer
        self.max_pixels = max_pixels
        self.decode_mask = decode_mask
        self._iteration = 0
        self._stats: _WorkerStats | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        worker, nworkers = _worker()
        if self._stats is None:  # lives as long as the (persistent) worker
            self._stats = _WorkerStats()
        stats = self._stats
        # A loader kept across epochs draws a new stream each pass; a caller that rebuilds
        # the loader per epoch with its own seed (stages.data) wants the stream fixed by that
        # seed alone, however often the loader is iterated (Lightning may open it twice).
        it = self._iteration if self.reseed_each_iter else 0
        self._iteration += 1
        mine = self.num_batches // nworkers + (worker < self.num_batches % nworkers)
        g, G = self.rank * nworkers + worker, self.world * nworkers

        streams = []
        for i, (urls, _) in enumerate(self.sources):
            # Disjoint shard subsets per (rank, worker) when there are enough shards;
            # otherwise everyone resamples all shards with a different seed.
            subset = urls[self.rank :: self.world][worker::nworkers] if len(urls) >= G else urls
            seed = make_seed(self.seed, i, g, it)
            pipe = wds.DataPipeline(
                wds.ResampledShards(subset, seed=seed, deterministic=True, worker_seed=_zero),
                partial(read_shards, stats=stats, max_empty=MAX_CONSECUTIVE_EMPTY_SHARDS),
                wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=random.Random(seed + 1))
                if self.shuffle_buffer > 1
                else None,
            )
            streams.append(iter(pipe))
        weights = [w for _, w in self.sources]
        mixed = _weighted_mix(streams, weights, random.Random(make_seed(self.seed, -1, g, it)))
        decoded = _decode_stage(
            mixed,
            stats,
            self.sample_fn,
            self.max_pixels,
            self.decode_mask,
            max_skips=MAX_CONSECUTIVE_SKIPS,
            decode_size=self.decode_size,
            drop=self.drop,
        )
        if self.batcher is not None:  # e.g. NaFlex: a planned length and size per batch
            batches = self.batcher(
                decoded,
                worker,
                nworkers,
                sample_collate(self.sample_fn),
                partial(_stamp, stats=stats, worker_id=worker),
            )
        else:
            batches = _batch_stage(
                decoded, self.batch_size, stats, worker, partial_last=False, collate_fn=sample_collate(self.sample_fn)
            )
        return islice(batches, mine)


def _zero() -> int:
    return 0


class _EvalStream(IterableDataset):
    """Every shard once: split by rank (fixed at build time), then by worker."""

    def __init__(self, urls, sample_fn, batch_size, rank, world, max_pixels, decode_mask, decode_size=None):
        super().__init__()
        self.decode_size = decode_size
        self.urls = urls
        self.sample_fn = sample_fn
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.max_pixels = max_pixels
        self.decode_mask = decode_mask
        self._stats: _WorkerStats | None = None

    def __iter__(self):
        worker, _ = _worker()
        if self._stats is None:
            self._stats = _WorkerStats()
        stats = self._stats
        pipe = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            partial(_split_by_rank, rank=self.rank, world=self.world),
            wds.split_by_worker,
            partial(read_shards, stats=stats),
            partial(
                _decode_stage,
                stats=stats,
                sample_fn=self.sample_fn,
                max_pixels=self.max_pixels,
                decode_mask=self.decode_mask,
                decode_size=self.decode_size,
            ),
            partial(
                _batch_stage,
                batch_size=self.batch_size,
                stats=stats,
                worker_id=worker,
                partial_last=True,
                trailer=True,
                collate_fn=sample_collate(self.sample_fn),
            ),
        )
        return iter(pipe)


def _loader(dataset, num_workers: int, generator: torch.Generator | None) -> DataLoader:
    # Batches are made inside the workers (so skip counts ride with them): batch_size=None.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # skip counts and RNG streams survive epochs
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )


def build_train_loader(
    sources,
    sample_fn: Callable[[DecodedSample], dict | None],
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_mask: bool = False,
    reseed_each_iter: bool = True,
    decode_size: tuple[int, int] | None = None,
    batcher: Callable | None = None,
    drop: KeyFilter | None = None,
) -> DataLoader:
    """Resampled training loader giving exactly ``num_batches`` batches per epoch per rank.

    ``sources``: a pattern, a list of patterns, or ``[{"urls": ..., "weight": w}, ...]``
    mixed per sample by weight (e.g. 0.9 English / 0.1 other pages). ``len(loader)`` is
    ``num_batches``. Worker ``i`` of ``W`` makes ``num_batches // W`` batches, plus one if
    ``i < num_batches % W``, so the total is exact for any worker count.
    ``decode_size`` (w, h): let JPEGs decode at a reduced scale no smaller than this (see
    :func:`decode_sample`); pass the transform's ``min_source_size()``.
    ``batcher(samples, worker, nworkers, collate, finish)``: makes this worker's batches from
    its sample stream instead of fixed-size batching (NaFlex: `siglip2.data.naflex.NaFlexBatches`).
    ``drop``: a `KeyFilter` (e.g. a balance table's dropped keys): those samples are skipped
    before decoding and counted under its reason.
    """
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}")
    srcs = _normalise_sources(sources)
    rank, world = get_rank_world()
    nworkers = max(num_workers, 1)
    for urls, _ in srcs:
        if len(urls) < world * nworkers:
            logger.warning(
                "only %d shards for %d ranks x %d workers: every worker resamples "
                "all of them (with its own seed) instead of a disjoint subset",
                len(urls),
                world,
                nworkers,
            )
    ds = _TrainStream(
        srcs,
        sample_fn,
        batch_size,
        num_batches,
        seed,
        rank,
        world,
        shuffle_buffer,
        max_pixels,
        decode_mask,
        reseed_each_iter,
        decode_size,
        batcher,
        drop,
    )
    gen = torch.Generator().manual_seed(make_seed(seed, rank, 7))
    return _loader(ds, num_workers, gen)


def build_eval_loader(
    urls,
    sample_fn: Callable[[DecodedSample], dict | None],
    batch_size: int,
    num_workers: int = 1,
    decode_mask: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_size: tuple[int, int] | None = None,
) -> DataLoader:
    """Every sample exactly once across ranks; the last batch of each worker may be short, and
    a worker whose last skips no batch carried ends with a batch of no samples carrying them
    (`skipped`, `worker_id` only: consumers fold it into their `SkipStats` and skip it).
    `decode_size`: JPEG draft decoding as `build_train_loader` does it (None: full size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    expanded = expand_urls(urls)
    rank, world = get_rank_world()
    ds = _EvalStream(expanded, sample_fn, batch_size, rank, world, max_pixels, decode_mask, decode_size)
    return _loader(ds, num_workers, None)
