"""How evaluation computes: bf16 towers and TF32 matmuls on a GPU, plain fp32 elsewhere.

Evaluation reads embeddings and argmaxes, never gradients, so on CUDA the towers (and the
LocCa decoder's greedy decoding) run under ``torch.autocast("cuda", torch.bfloat16)``, as
training's ``bf16-mixed`` does, and the float32 matmuls left outside it (the metrics'
similarities, the dense probe's training) may use TF32. The embeddings the metrics read stay
float32 (`ImageOutput.embeds`, `SigLIP2.embed_text` normalise in float32). On CPU nothing
changes: fp32 throughout, the numbers the CPU tests pin.

- `eval_precision(device)`: for a whole evaluation; on CUDA, TF32 for float32 matmuls
  (``torch.set_float32_matmul_precision("high")``) and cuDNN convolutions, restored on exit.
- `tower_autocast(device)`: around each tower or decoder call; bf16 autocast on CUDA, a
  no-op context elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["eval_precision", "tower_autocast", "is_cuda"]


def is_cuda(device: torch.device | str | int | None) -> bool:
    """Whether ``device`` names a CUDA device (an int is a CUDA index, as torch reads it)."""
    if device is None:
        return False
    return torch.device(device).type == "cuda"


def tower_autocast(device: torch.device | str | int | None) -> contextlib.AbstractContextManager:
    """``torch.autocast("cuda", dtype=torch.bfloat16)`` on CUDA; ``contextlib.nullcontext()``
    on any other device (CPU evaluation stays fp32)."""
    if is_cuda(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_precision(device: torch.device | str | int | None) -> Iterator[None]:
    """On CUDA: float32 matmuls and cuDNN convolutions may use TF32 while inside (the
    previous settings come back on exit, also on error). Elsewhere: nothing changes."""
    if not is_cuda(device):
        yield
        return
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
