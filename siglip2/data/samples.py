"""One training example from one decoded sample: image view, caption tokens, LocCa targets.

This is the ``sample_fn`` that :func:`siglip2.data.shards.build_train_loader` runs in its
workers on every :class:`~siglip2.data.decode.DecodedSample`, and its ``collate`` makes the
batch: captions and LocCa texts are tokenised there, per batch, in one batch call of the
tokenizer each (not once per sample). It takes typed pieces (a
tokenizer, an image transform, a :class:`~siglip2.data.locca_targets.LoccaFormat`), not
config mappings; ``stages.data`` builds them from the config.

Per-sample randomness (which region LocCa draws) comes from :func:`sample_seed`, a hash of
run seed, epoch and sample key, so it does not depend on the worker count, the worker a
sample lands on, or any process RNG state.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from typing import Any

import torch

from siglip2.data.decode import DecodedSample
from siglip2.data.locca_targets import LoccaFormat, encode_locca, locca_requests, region_boxes
from siglip2.data.tokenizer import Tokenizer
from siglip2.data.transforms import ImageTransform

__all__ = ["TrainSample", "sample_seed"]


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Per-sample randomness that does not depend on worker count or process RNG state.

    Returns an unsigned 64-bit int (blake2b of ``"{seed}/{epoch}/{key}"``), the same in
    every process for the same arguments.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TrainSample:
    """DecodedSample -> training example (``__call__``, per sample) -> batch (``collate``).

    LocCa boxes go through the same geometric transform as the image, so ARef/GCap targets
    describe what the model sees.

    Arguments: ``tokenizer`` (fixed-length ids), ``transform`` (PIL image + optional boxes ->
    tensor + moved boxes), ``seed`` and ``epoch`` (see :func:`sample_seed`), ``locca``: the
    LocCa prompt format, or None for no LocCa targets.

    A call returns ``image`` (the transform's output: uint8 or float32 (3, H, W)),
    ``caption`` str, ``key`` str, ``lang`` str (the sample json's ``lang`` or ``language``, ""
    without one) and, with ``locca``, ``locca`` (the sample's
    :class:`~siglip2.data.locca_targets.LoccaRequest` list: the region draws are made here,
    seeded per sample). Malformed ``regions`` are not an error: that sample trains Cap only.
    Never returns None.

    ``collate(samples)`` returns the batch: ``image`` (B, 3, H, W) stacked, ``text`` (B, L)
    int64 caption ids (L = tokenizer length), ``caption``/``key``/``lang`` lists and, with
    ``locca``, ``locca_{t}_input``/``locca_{t}_target`` (B, max_len) and ``locca_{t}_valid``
    (B,) for t in cap, aref, gcap (see :mod:`siglip2.data.locca_targets`).

    ``caption_noise`` p in [0, 1): alt-text noise for experiments (issue 28, for ACID): a
    sample is *noisy* when a hash of (seed, key) falls under p, the same samples in every
    epoch and whatever the worker count, and its caption is replaced by the caption of another
    sample this worker delivered recently (one of the last ``NOISE_POOL``; the draw is seeded
    per sample and epoch). The LocCa captioning target follows the replaced caption; region
    captions stay (they describe the image). With p > 0 each example also carries
    ``caption_noisy`` (a bool; the batch a (B,) bool tensor): whether its caption was replaced
    (the first sample a worker sees has no other caption to take and stays clean).
    Raises ``ValueError`` for p outside [0, 1).

    ``extra_images``: more views of the same decoded image, by batch key, each from its own
    deterministic transform (no boxes), e.g. ``{"teacher_image": ImageTransform(384)}``: ACID's
    teacher at its own resolution from the source pixels, not the learner's resized again.
    """

    NOISE_POOL = 64

    def __init__(
        self,
        tokenizer: Tokenizer,
        transform: ImageTransform,
        seed: int,
        epoch: int,
        locca: LoccaFormat | None = None,
        caption_noise: float = 0.0,
        extra_images: dict[str, ImageTransform] | None = None,
    ):
        self.tokenizer = tokenizer
        self.transform = transform
        self.extra_images = dict(extra_images or {})
        self.seed, self.epoch = seed, epoch
        self.locca_format = locca
        if not 0.0 <= float(caption_noise) < 1.0:
            raise ValueError(f"caption_noise is the share of captions replaced, in [0, 1); got {caption_noise}")
        self.caption_noise = float(caption_noise)
        self._recent: deque[str] = deque(maxlen=self.NOISE_POOL)  # per worker: each has its own copy

    def is_noisy(self, key: str) -> bool:
        """Whether sample `key`'s caption is replaced (epoch-independent; see the class doc)."""
        if self.caption_noise <= 0.0:
            return False
        digest = hashlib.blake2b(f"{self.seed}/caption_noise/{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64 < self.caption_noise

    def _caption(self, sample: DecodedSample) -> tuple[str, bool]:
        own = sample.caption
        if self.caption_noise <= 0.0:
            return own, False
        pool = [c for c in self._recent if c != own]
        self._recent.append(own)
        if not pool or not self.is_noisy(sample.key):
            return own, False
        rng = random.Random(sample_seed(self.seed, self.epoch, sample.key) ^ 0x5EED)
        return pool[rng.randrange(len(pool))], True

    def __call__(self, sample: DecodedSample) -> dict[str, Any] | None:
        regions = (sample.meta.get("regions") or []) if isinstance(sample.meta, dict) else []
        boxes = None
        if self.locca_format is not None and regions:
            try:
                boxes = region_boxes(regions)
            except (KeyError, TypeError, ValueError):
                regions, boxes = [], None  # malformed regions: this sample trains Cap only
        image, boxes = self.transform(sample.image, boxes)
        caption, noisy = self._caption(sample)
        out: dict[str, Any] = {"image": image, "caption": caption, "key": sample.key, "lang": _language(sample.meta)}
        for name, transform in self.extra_images.items():
            out[name] = transform(sample.image, None)[0]
        if self.caption_noise > 0.0:
            out["caption_noisy"] = torch.tensor(noisy)
        if self.locca_format is not None:
            rng = random.Random(sample_seed(self.seed, self.epoch, sample.key))
            out["locca"] = locca_requests(caption, regions, rng, self.locca_format, boxes=boxes)
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack the samples into a batch and tokenise its texts in batch calls."""
        from siglip2.data.shards import collate

        requests = [s.pop("locca") for s in samples] if samples and "locca" in samples[0] else None
        batch = collate(samples)
        if samples:
            batch["text"] = self.tokenizer(batch["caption"])
        if requests is not None:
            batch.update(encode_locca(self.tokenizer, requests, self.locca_format))
        return batch


def _language(meta) -> str:
    """The caption's language code from the sample json (`lang`, else `language`), "" if none."""
    if not isinstance(meta, dict):
        return ""
    value = meta.get("lang", meta.get("language"))
    return value if isinstance(value, str) else ""
