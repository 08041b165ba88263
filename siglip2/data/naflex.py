"""NaFlex preprocessing [P §2.4.2; RECIPE.md "NaFlex"]: native aspect ratio, variable length.

Each image is resized, keeping its aspect ratio as far as whole patches allow, to the largest
size whose patch grid fits a sequence length, then cut into patches and padded to the batch's
length. What the model reads (`siglip2.model.vit` NaFlex input, HF `Siglip2Model`):

    patches       (B, L, p*p*C)  row-major (y, x) patches, each flattened (ph, pw, C)
    patch_coord   (B, L, 2)      (y, x) of each patch in its image's grid; 0 for padding
    patch_valid   (B, L) bool    True = real patch (HF `pixel_attention_mask`)
    spatial_shapes (B, 2)        (h, w) patch grid of each image (HF `spatial_shapes`)

The size rule is transformers' `get_image_size_for_max_num_patches` itself (the released
models' processor; big_vision's `ops_naflex` and timm's `get_image_size_for_seq` are the same
binary search, checked in tests): scale in (1e-6, 100), each side
`max(p, p * ceil(side * scale / p))`, the largest scale whose grid has at most `max_patches`
patches. The ceil stretches each side by less than one patch, so the aspect ratio moves
slightly; boxes given in normalised [0, 1] image coordinates (LocCa targets) stay exact,
because the whole image is resized, never cropped or padded.

Pixels are resized from uint8 with antialiased bilinear (`torchvision.transforms.v2.functional
.resize(antialias=True)`, what HF's torchvision-backed `Siglip2ImageProcessor` and big_vision
use), so the patches equal HF's processor output on the same image.

A batch's sequence length comes from `SeqLenPlan`, a pure function of (seed, batch index),
drawn before any sample is transformed, so every rank and every worker agrees.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from siglip2.patches import patchify

__all__ = [
    "image_size_for_max_patches",
    "resize_for_max_patches",
    "patchify_image",
    "pad_patches",
    "NaFlexConfig",
    "SeqLenPlan",
]


def image_size_for_max_patches(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(height, width) in pixels, multiples of `patch_size`, of an image of `height` x `width`
    resized for at most `max_patches` patches (at least one patch a side, which can exceed
    `max_patches` only for aspect ratios beyond `max_patches`:1). transformers'
    `get_image_size_for_max_num_patches`. Raises `ValueError` for non-positive arguments."""
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    if min(height, width, patch_size, max_patches) < 1:
        raise ValueError(
            f"need positive height, width, patch_size and max_patches, got {(height, width, patch_size, max_patches)}"
        )
    return get_image_size_for_max_num_patches(int(height), int(width), int(patch_size), int(max_patches))


def resize_for_max_patches(image: torch.Tensor, patch_size: int, max_patches: int) -> torch.Tensor:
    """(C, H, W) uint8 (or float) image -> (C, h, w) of the same dtype, (h, w) from
    `image_size_for_max_patches`; antialiased bilinear (up- or downscaling)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    h, w = image_size_for_max_patches(image.shape[-2], image.shape[-1], patch_size, max_patches)
    if (h, w) == tuple(image.shape[-2:]):
        return image
    return TF.resize(image, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)


def patchify_image(image: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(C, h, w) with h, w multiples of `patch_size` -> ((h/p * w/p, p*p*C) row-major patches
    flattened (ph, pw, C) as HF's `convert_image_to_patches`, (h/p, w/p)): one image through
    `siglip2.patches.patchify`, the tower's own."""
    c, h, w = image.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a whole number of {patch_size}-px patches")
    patches, grid = patchify(image[None], patch_size)
    return patches[0], grid


def pad_patches(items: Sequence[tuple[torch.Tensor, tuple[int, int]]], seq_len: int) -> dict[str, torch.Tensor]:
    """Stack per-image (patches (N_i, D), (h_i, w_i)) into a batch padded to `seq_len`:
    `patches` (B, L, D) (dtype kept: uint8 stays uint8), `patch_coord` (B, L, 2) int32,
    `patch_valid` (B, L) bool, `spatial_shapes` (B, 2) int64. Raises `ValueError` if an image
    has more than `seq_len` patches."""
    if not items:
        raise ValueError("no images to pad")
    dim, dtype = items[0][0].shape[-1], items[0][0].dtype
    b = len(items)
    patches = torch.zeros(b, seq_len, dim, dtype=dtype)
    coord = torch.zeros(b, seq_len, 2, dtype=torch.int32)
    valid = torch.zeros(b, seq_len, dtype=torch.bool)
    shapes = torch.zeros(b, 2, dtype=torch.int64)
    for i, (p, (gh, gw)) in enumerate(items):
        n = p.shape[0]
        if n != gh * gw:
            raise ValueError(f"image {i}: {n} patches for a {gh}x{gw} grid")
        if n > seq_len:
            raise ValueError(f"image {i} has {n} patches ({gh}x{gw}), more than the sequence length {seq_len}")
        patches[i, :n] = p
        yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coord[i, :n, 0], coord[i, :n, 1] = yy.reshape(-1), xx.reshape(-1)
        valid[i, :n] = True
        shapes[i, 0], shapes[i, 1] = gh, gw
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid, "spatial_shapes": shapes}


@dataclass
class NaFlexConfig:
    """`naflex.*`: the sequence lengths drawn per batch (the paper's {128, 256, 576, 784,
    1024}; the tiny demo model uses a scaled-down set in its stage config), how a batch is
    sized (`examples`: the paper, a fixed number of examples, halved at the largest length
    for two steps; `tokens`: timm / open_clip, a fixed token budget `tokens_per_batch`,
    default batch size x the middle length) and the plan's seed offset."""

    seq_lens: tuple[int, ...] = (128, 256, 576, 784, 1024)
    batching: str = "examples"
    halve_at_max: bool = True
    tokens_per_batch: int | None = None
    seed: int = 0
    eval_seq_len: int | None = None  # the stage's evaluation length (`eval.naflex_seq_len`)

    def __post_init__(self):
        self.seq_lens = tuple(sorted(int(s) for s in self.seq_lens))
        if not self.seq_lens or self.seq_lens[0] < 1:
            raise ValueError(f"naflex.seq_lens must be positive lengths, got {self.seq_lens}")
        if self.batching not in ("examples", "tokens"):
            raise ValueError(f"naflex.batching must be 'examples' or 'tokens', got {self.batching!r}")


@dataclass
class SeqLenPlan:
    """The sequence length and batch size of every batch, from (seed, batch index) alone.

    `examples` batching draws one length per *slot* uniformly from `seq_lens`; a slot at the
    largest length becomes two consecutive batches of half the examples (the paper: the
    same examples, twice the steps), every other slot one batch of `batch_size`. `tokens`
    batching draws one length per batch and sizes it to `tokens_per_batch // length`
    examples (at least 1). Counting is per rank: batch k of every rank has the same length.
    `plan(k)` -> (seq_len, examples in batch k).
    """

    config: NaFlexConfig
    batch_size: int
    _steps: list[tuple[int, int]] = field(default_factory=list, repr=False)
    _slot: int = field(default=0, repr=False)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.config.batching == "examples" and self.config.halve_at_max and self.batch_size % 2:
            raise ValueError(f"naflex halves the batch at the largest length: batch_size {self.batch_size} is odd")

    def _draw(self, slot: int) -> int:
        return random.Random(f"{self.config.seed}:{slot}").choice(self.config.seq_lens)

    def __call__(self, index: int) -> tuple[int, int]:
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        cfg = self.config
        if cfg.batching == "tokens":
            length = self._draw(index)
            budget = cfg.tokens_per_batch or self.batch_size * cfg.seq_lens[len(cfg.seq_lens) // 2]
            return length, max(1, budget // length)
        while len(self._steps) <= index:  # expand slots into batches, in order, once
            length = self._draw(self._slot)
            self._slot += 1
            if length == cfg.seq_lens[-1] and cfg.halve_at_max and len(cfg.seq_lens) > 1:
                self._steps += [(length, self.batch_size // 2)] * 2
            else:
                self._steps.append((length, self.batch_size))
        return self._steps[index]

    @property
    def nominal_batch_size(self) -> int:
        """The batch size the plan's batches stand for: `batch_size` for `examples` batching
        (halved batches are half of it), the budget over the middle length for `tokens`
        (`batch_size` with the default budget). What `SigmoidLoss(nominal_batch_size=)`
        weights every other size to."""
        cfg = self.config
        if cfg.batching == "tokens" and cfg.tokens_per_batch:
            return max(1, cfg.tokens_per_batch // cfg.seq_lens[len(cfg.seq_lens) // 2])
        return self.batch_size

    def examples_per_batch_mean(self, batches: int = 10_000) -> float:
        """Mean examples per batch over the first `batches` (for step-count planning)."""
        return sum(self(i)[1] for i in range(batches)) / batches


class NativeImage:
    """The per-sample "transform" of NaFlex training: the decoded image as a uint8 (3, H, W)
    tensor at its own size, boxes unchanged (normalised boxes survive the later whole-image
    resize). The resize to the batch's length happens in `NaFlexBatches`, after the plan is
    drawn. Same call signature as `siglip2.data.transforms.ImageTransform`."""

    def __call__(self, img, boxes: torch.Tensor | None = None):
        from torchvision.transforms.v2 import functional as TF

        x = TF.pil_to_tensor(img) if not torch.is_tensor(img) else img
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected an RGB image, got shape {tuple(x.shape)}")
        return x, boxes

    def min_source_size(self) -> None:
        return None  # no draft decoding: the largest sequence length decides the size per batch


class NaFlexBatches:
    """Worker-side batching for NaFlex training (`siglip2.data.shards.build_train_loader`'s
    `batcher`). Batch k of a rank (k = offset + j * workers + worker: the DataLoader takes
    batches round-robin from its workers) gets (length, examples) = plan(k); its samples'
    uint8 `image`s are resized for at most `length` patches, patchified and padded to
    `length`: the batch holds uint8 `patches` (B, length, p*p*3), `patch_coord`,
    `patch_valid`, `spatial_shapes` and no `image` (the stage converts to [-1, 1] on the
    device). Every other key is collated as usual."""

    def __init__(self, plan: SeqLenPlan, patch_size: int, offset: int = 0):
        self.plan, self.patch_size, self.offset = plan, int(patch_size), int(offset)

    def __call__(self, samples, worker: int, nworkers: int, collate, finish):
        from itertools import islice

        it = iter(samples)
        j = 0
        while True:
            length, size = self.plan(self.offset + j * nworkers + worker)
            buf = list(islice(it, size))
            if len(buf) < size:
                return
            items = [
                patchify_image(resize_for_max_patches(s.pop("image"), self.patch_size, length), self.patch_size)
                for s in buf
            ]
            batch = collate(buf)
            batch.update(pad_patches(items, length))
            yield finish(batch)
            j += 1
