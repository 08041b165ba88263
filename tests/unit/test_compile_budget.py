"""The vision tower under `torch.compile` compiles once per input shape, not once per mix of
NaFlex grids, and the NaFlex position embedding is HF's resize (bilinear, antialias).

Before, `posemb_for_batch` resized the table once per distinct grid of the batch
(`torch.unique(...).tolist()`): a graph break, and a recompile for every new number of
distinct grids until dynamo's recompile limit (8), after which the tower ran eager. Now the
resize is one fixed-shape linear map per token. Compiles are counted with a backend that
records each graph it is handed (`backend="eager"` semantics: it runs the graph as traced).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from siglip2.data.naflex import pad_patches
from siglip2.model import build_model, posemb_for_batch

MODEL = {
    "name": "t",
    "embed_dim": 16,
    "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=4, image_size=16),
    "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=20, max_len=4),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest.one_thread)."""


class CountingBackend:
    """A dynamo backend that runs each graph eagerly and counts the graphs compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _naflex_batch(rng: random.Random, seq_len: int, distinct: int, batch: int = 6):
    """A padded batch whose images have `distinct` different grids (h, w), h * w <= seq_len."""
    grids = set()
    while len(grids) < distinct:
        h = rng.randint(1, seq_len)
        grids.add((h, rng.randint(1, seq_len // h)))
    grids = sorted(grids)
    shapes = [grids[i % distinct] for i in range(batch)]
    return pad_patches([(torch.rand(h * w, 48), (h, w)) for h, w in shapes], seq_len=seq_len)


def test_naflex_tower_compiles_once_per_sequence_length():
    torch.manual_seed(0)
    vision = build_model(MODEL).vision_model.eval()
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(vision, backend=backend)
    rng = random.Random(0)
    try:
        with torch.no_grad():
            for distinct in (1, 2, 3, 4, 5, 6, 3, 1, 6, 2):  # ten mixes of grids, one sequence length
                b = _naflex_batch(rng, 24, distinct)
                got = compiled(
                    patches=b["patches"],
                    patch_coord=b["patch_coord"],
                    patch_valid=b["patch_valid"],
                    spatial_shapes=b["spatial_shapes"],
                ).pooled
                want = vision(
                    patches=b["patches"],
                    patch_coord=b["patch_coord"],
                    patch_valid=b["patch_valid"],
                    spatial_shapes=b["spatial_shapes"],
                ).pooled
                torch.testing.assert_close(got, want)
            assert backend.graphs == 1, f"{backend.graphs} graphs for one sequence length"
            b = _naflex_batch(rng, 40, 3)  # a new sequence length: one more compile at most
            compiled(
                patches=b["patches"],
                patch_coord=b["patch_coord"],
                patch_valid=b["patch_valid"],
                spatial_shapes=b["spatial_shapes"],
            )
            assert backend.graphs <= 2
    finally:
        torch._dynamo.reset()


def test_fixed_resolution_tower_compiles_once():
    torch.manual_seed(0)
    vision = build_model(MODEL).vision_model.eval()
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(vision, backend=backend)
    try:
        with torch.no_grad():
            for seed in range(4):
                image = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
                torch.testing.assert_close(compiled(image=image).pooled, vision(image=image).pooled)
        assert backend.graphs == 1
    finally:
        torch._dynamo.reset()


def test_posemb_is_the_antialiased_bilinear_resize_of_each_grid():
    """Against transformers' Siglip2 resize and against `F.interpolate(bilinear, antialias)`
    itself, per image, for upsampled, downsampled, mixed, 1-cell and identity grids; padding
    rows hold one of the image's own cells; gradients reach the table."""
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    torch.manual_seed(0)
    table = torch.randn(16 * 16, 8, requires_grad=True)
    shapes = torch.tensor([[16, 16], [14, 14], [24, 24], [7, 30], [32, 8], [1, 1], [3, 5], [1, 64], [64, 1], [2, 16]])
    ours = posemb_for_batch(table, shapes, 1024)
    hf = Siglip2VisionEmbeddings.resize_positional_embeddings(
        table.detach().reshape(16, 16, 8), shapes, max_length=1024
    )
    grid = table.detach().reshape(16, 16, 8).permute(2, 0, 1)[None]
    for i, (h, w) in enumerate(shapes.tolist()):
        torch.testing.assert_close(ours[i, : h * w], hf[i, : h * w], atol=1e-6, rtol=1e-6)
        # a real channels-last copy: PyTorch 2.14's NCHW CPU kernel is off for 1-wide outputs
        # of more than one row (up to ~1.0 at (64, 1)); the channels-last kernel is not
        ref = F.interpolate(
            grid.clone(memory_format=torch.channels_last),
            size=(h, w),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        torch.testing.assert_close(ours[i, : h * w], ref[0].reshape(8, h * w).t(), atol=1e-5, rtol=1e-5)
        cells = ours[i, : h * w].detach()
        assert all((cells == row).all(-1).any() for row in ours[i, h * w :].detach()[:3])
    assert torch.equal(ours[0, :256], table.detach())  # the identity grid is the table itself
    ours[:, :5].sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
