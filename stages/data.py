"""The LightningDataModule that turns shards into training batches for every stage.

Wiring only: the per-sample work (image view, tokens, LocCa targets) is
`siglip2.data.samples.TrainSample`, the stream is `siglip2.data.shards.build_train_loader`.

It builds the embedded demo when asked (before the tokenizer, which the demo trains), holds
the tokenizer, and rebuilds the training loader every epoch with `seed + epoch` so that
resampled shards differ between epochs and a resumed run sees the data an uninterrupted one
would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from siglip2.losses.locca import locca_host_bounds

from siglip2.data.locca_targets import LoccaFormat
from siglip2.data.samples import TrainSample
from siglip2.data.shards import build_train_loader
from siglip2.data.tokenizer import build_tokenizer
from siglip2.data.transforms import ImageTransform, normalize_pixels

log = logging.getLogger(__name__)


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
        naflex: Mapping[str, Any] | None = None,
        patch_size: int | None = None,
        filter_ratio: float = 0.0,
        caption_noise: float = 0.0,
        balance_table: str | None = None,
    ):
        """`draft_decode`: let JPEGs much larger than the training size decode at 1/2, 1/4
        or 1/8 scale (never below it; see `siglip2.data.decode.decode_sample`). `naflex`:
        `siglip2.data.naflex.NaFlexConfig` keys (set by `stage=naflex`): native-aspect
        batches of patches at a planned sequence length per batch, `patch_size` pixels a side.
        `filter_ratio` f (set by `stage=acid`): the loader yields super-batches of
        b / (1 - f) examples per rank, of which the stage trains `batch_size` = b.
        `caption_noise` p: that share of training captions replaced by another sample's, to
        mimic alt-text noise (`siglip2.data.samples.TrainSample`; 0 = off). `balance_table`: an M4
        keep table (`python -m siglip2.data.balance`); the samples it drops are skipped before
        decoding and counted as `data/filtered_balance`."""
        super().__init__()
        self.demo = None
        if demo and demo.get("root"):  # `debug=fast` sets demo.num_train even on data=webdataset
            from siglip2.data.demo import ensure_demo

            self.demo = ensure_demo(
                demo["root"],
                num_train=int(demo["num_train"]),
                seed=int(demo["seed"]),
                **{k: float(demo[k]) for k in ("word_share", "bias_strength", "bias_share") if k in demo},
            )
        if sources:
            self.sources = [dict(s) for s in sources]
        elif train:
            self.sources = train if isinstance(train, str) else list(train)
        elif self.demo is not None:
            self.sources = self.demo.train_urls
        else:
            raise ValueError("data: set data.train (a shard pattern), data.sources, or use data=demo")
        tok = dict(tokenizer)
        self.tokenizer_path = str(tok["path"])
        self.tokenizer = build_tokenizer(
            tok["path"], length=int(tok.get("length", text_length)), lowercase=bool(tok.get("lowercase", True))
        )
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        from siglip2.acid import CurationConfig

        self.loader_batch_size = CurationConfig(filter_ratio=float(filter_ratio or 0.0)).super_batch(self.batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.random_resized_crop = bool(random_resized_crop)
        self.crop_scale = tuple(crop_scale)
        self.max_pixels = int(max_pixels)
        self.locca_targets = dict(locca_targets) if locca_targets else None
        self.draft_decode = bool(draft_decode)
        self.caption_noise = float(caption_noise or 0.0)
        if not 0.0 <= self.caption_noise < 1.0:
            raise ValueError(
                f"data.caption_noise is the share of training captions replaced by another "
                f"sample's, in [0, 1); got {caption_noise}"
            )
        if self.caption_noise > 0.0:
            log.info(
                "data.caption_noise=%g: about %.0f%% of training captions are replaced by another sample's "
                "(the same samples every epoch)",
                self.caption_noise,
                100 * self.caption_noise,
            )
        self.drop = None
        if balance_table:
            from siglip2.data.balance import FILTER_REASON, load_dropped
            from siglip2.data.shards import KeyFilter

            self.drop = KeyFilter(load_dropped(balance_table), FILTER_REASON)
            self._check_table_shards(balance_table)
            log.info(
                "data.balance_table=%s: %d samples are left out (counted as data/%s)",
                balance_table,
                len(self.drop.keys),
                FILTER_REASON,
            )
        self.naflex = None
        if naflex:
            from siglip2.config import from_dict
            from siglip2.data.naflex import NaFlexConfig, SeqLenPlan

            if not patch_size:
                raise ValueError("NaFlex batches (stage.naflex) need data.patch_size (the model's patch size)")
            self.naflex = from_dict(NaFlexConfig, dict(naflex), "stage.naflex")
            self.patch_size = int(patch_size)
            self.plan = SeqLenPlan(self.naflex, self.batch_size)
        # Fail before training if a pattern matches nothing.
        from siglip2.data.shards import expand_urls

        for urls in (
            [s["urls"] for s in self.sources]
            if isinstance(self.sources, list) and self.sources and isinstance(self.sources[0], dict)
            else [self.sources]
        ):
            expand_urls(urls)

    def _check_table_shards(self, table: str) -> None:
        """A balance table names its shards by folder and file (`shard_name`): one whose shards
        this run does not read would drop nothing, silently. Refused, naming both."""
        from siglip2.data.shards import expand_urls, shard_name

        srcs = self.sources if isinstance(self.sources, list) else [self.sources]
        urls = [u for s in srcs for u in expand_urls(s["urls"] if isinstance(s, dict) else s)]
        ours, theirs = {shard_name(u) for u in urls}, self.drop.shards()
        if theirs and not ours & theirs:
            raise ValueError(
                f"data.balance_table={table} drops samples of shards {sorted(theirs)[:3]}..., none of "
                f"which this run reads ({sorted(ours)[:3]}...): build the table on these shards "
                "(python -m siglip2.data.balance --shards ...)"
            )
        if theirs - ours:
            log.warning(
                "data.balance_table: %d of the %d shards it drops samples from are not in this run",
                len(theirs - ours),
                len(theirs),
            )

    # ACID's teacher at its own resolution (`stage.acid.teacher_pixels=source`): the stage sets
    # the teacher's image size here before the loaders are built; each training sample then
    # also carries `teacher_image`, the source image squashed to it (uint8, like `image`).
    teacher_image_size: int | None = None

    def train_dataloader(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        batcher = None
        extra = {}
        if self.naflex is not None:  # native aspect, planned length per batch (NaFlexBatches)
            from siglip2.data.naflex import NaFlexBatches, NativeImage

            transform = NativeImage()
            batcher = NaFlexBatches(self.plan, self.patch_size, offset=epoch * self.batches_per_epoch)
        else:
            transform = ImageTransform(
                self.image_size, random_resized_crop=self.random_resized_crop, scale=self.crop_scale, dtype="uint8"
            )  # [-1, 1] on the device
            if self.teacher_image_size:
                extra["teacher_image"] = ImageTransform(int(self.teacher_image_size), dtype="uint8")
        # draft decoding may shrink a JPEG to the largest size any transform needs (NaFlex: None, no draft)
        decode = [transform.min_source_size()] + [t.min_source_size() for t in extra.values()]
        decode_size = (
            None if not self.draft_decode or None in decode else (max(w for w, _ in decode), max(h for _, h in decode))
        )
        locca = LoccaFormat(**self.locca_targets) if self.locca_targets else None
        sample_fn = TrainSample(
            self.tokenizer, transform, self.seed, epoch, locca, caption_noise=self.caption_noise, extra_images=extra
        )
        return build_train_loader(
            self.sources,
            sample_fn,
            batch_size=self.loader_batch_size,
            num_batches=self.batches_per_epoch,
            seed=self.seed * 1_000_003 + epoch,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            max_pixels=self.max_pixels,
            reseed_each_iter=False,
            decode_size=decode_size,
            batcher=batcher,
            drop=self.drop,
        )

    @property
    def mean_batch_size(self) -> float:
        """Mean examples per batch (NaFlex halves some batches); the batch size otherwise."""
        return self.plan.examples_per_batch_mean() if self.naflex is not None else float(self.batch_size)

    @property
    def nominal_batch_size(self) -> int:
        """Per rank, the batch size the loss weights every batch to (`SigmoidLoss`): the NaFlex
        plan's nominal size, `batch_size` otherwise (ACID: the trained batch, not its super-batch)."""
        return self.plan.nominal_batch_size if self.naflex is not None else int(self.batch_size)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The workers' uint8 pixels (`image`, NaFlex `patches`) become float32 in [-1, 1]
        here, on the device (`siglip2.data.transforms.normalize_pixels`)."""
        return normalize_pixels(batch) if isinstance(batch, dict) else batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Keys, skip counters and worker ids stay on the host; tensors move.
        # LocCa's work bounds are counted here, on the host batch, so that the loss trims the
        # padded length without asking the device (siglip2.losses.locca.locca_host_bounds).
        if isinstance(batch, dict):
            moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            return {**moved, **locca_host_bounds(batch)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
