"""The LightningDataModule that turns shards into training batches for every stage.

It builds the embedded demo when asked (before the tokenizer, which the demo trains), holds
the tokenizer, and rebuilds the training loader every epoch with `seed + epoch` so that
resampled shards differ between epochs and a resumed run sees the data an uninterrupted one
would have seen.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from siglip2.data.locca_targets import LoccaFormat, build_locca_targets, region_boxes
from siglip2.data.shards import DecodedSample, build_train_loader
from siglip2.data.tokenizer import Tokenizer, build_tokenizer
from siglip2.data.transforms import ImageTransform

log = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Per-sample randomness that does not depend on worker count or process RNG state."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TrainSample:
    """DecodedSample -> training example: image, tokens and (optionally) LocCa targets.

    LocCa boxes go through the same geometric transform as the image, so ARef/GCap targets
    describe what the model sees.
    """

    def __init__(self, tokenizer: Tokenizer, transform: ImageTransform, seed: int, epoch: int,
                 locca_targets: Mapping[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.transform = transform
        self.seed, self.epoch = seed, epoch
        self.locca_format = LoccaFormat(**dict(locca_targets)) if locca_targets else None

    def __call__(self, sample: DecodedSample) -> dict[str, Any] | None:
        regions = (sample.meta.get("regions") or []) if isinstance(sample.meta, dict) else []
        boxes = None
        if self.locca_format is not None and regions:
            try:
                boxes = region_boxes(regions)
            except (KeyError, TypeError, ValueError):
                regions, boxes = [], None  # malformed regions: this sample trains Cap only
        image, boxes = self.transform(sample.image, boxes)
        out: dict[str, Any] = {"image": image, "text": self.tokenizer(sample.caption)[0], "key": sample.key}
        if self.locca_format is not None:
            rng = random.Random(sample_seed(self.seed, self.epoch, sample.key))
            out.update(build_locca_targets(self.tokenizer, sample.caption, regions, rng, self.locca_format,
                                           boxes=boxes))
        return out


class ImageTextData(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: Mapping[str, Any],
        image_size: int,
        batch_size: int,
        batches_per_epoch: int,
        text_length: int = 64,
        demo: Mapping[str, Any] | None = None,
        train: str | list[str] | None = None,
        sources: list[Mapping[str, Any]] | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        random_resized_crop: bool = False,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        max_pixels: int = 40_000_000,
        locca_targets: Mapping[str, Any] | None = None,
        draft_decode: bool = True,
    ):
        """`draft_decode`: let JPEGs much larger than the training size decode at 1/2, 1/4
        or 1/8 scale (never below it; see `siglip2.data.shards.decode_sample`)."""
        super().__init__()
        self.demo = None
        if demo:
            from siglip2.data.demo import ensure_demo

            self.demo = ensure_demo(demo["root"], num_train=int(demo["num_train"]), seed=int(demo["seed"]))
        if sources:
            self.sources = [dict(s) for s in sources]
        elif train:
            self.sources = train if isinstance(train, str) else list(train)
        elif self.demo is not None:
            self.sources = self.demo.train_urls
        else:
            raise ValueError("data: set data.train (a shard pattern), data.sources, or use data=demo")
        tok = dict(tokenizer)
        self.tokenizer = build_tokenizer(tok["path"], length=int(tok.get("length", text_length)),
                                         lowercase=bool(tok.get("lowercase", True)))
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.random_resized_crop = bool(random_resized_crop)
        self.crop_scale = tuple(crop_scale)
        self.max_pixels = int(max_pixels)
        self.locca_targets = dict(locca_targets) if locca_targets else None
        self.draft_decode = bool(draft_decode)
        # Fail before training if a pattern matches nothing.
        from siglip2.data.shards import expand_urls

        for urls in ([s["urls"] for s in self.sources] if isinstance(self.sources, list)
                     and self.sources and isinstance(self.sources[0], dict) else [self.sources]):
            expand_urls(urls)

    def train_dataloader(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        transform = ImageTransform(self.image_size, random_resized_crop=self.random_resized_crop,
                                   scale=self.crop_scale)
        sample_fn = TrainSample(self.tokenizer, transform, self.seed, epoch, self.locca_targets)
        return build_train_loader(
            self.sources, sample_fn, batch_size=self.batch_size, num_batches=self.batches_per_epoch,
            seed=self.seed * 1_000_003 + epoch, num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer, max_pixels=self.max_pixels, reseed_each_iter=False,
            decode_size=transform.min_source_size() if self.draft_decode else None,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Keys, skip counters and worker ids stay on the host; tensors move.
        if isinstance(batch, dict):
            return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
