"""ACID's frozen teacher [P §2.5; ACID arXiv 2411.18674]: loading it, its inputs, its cache.

The teacher is one of our checkpoints (its student) or a transformers folder (`hf:<folder>`),
read by `siglip2.checkpoint.load_model`, frozen: eval mode, no gradient. It may be any
size, resolution and text length: the learner's batch, images (B, 3, S, S) and ids (B, L),
is refitted to it (`teacher_inputs`). Its pair losses against the learner's give the
learnability matrix that `siglip2.acid.selection` chooses from.

Frozen, its embeddings can be computed once (`python -m siglip2.acid cache`, see
`siglip2.acid.__main__`) and read instead of running it every step (`TeacherCache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from siglip2.checkpoint import load_model, load_plain
from siglip2.data.tokenizer import TokenizerRecord, check_vocab_size
from siglip2.model import SigLIP2


def load_teacher(spec: str) -> tuple[SigLIP2, dict[str, Any]]:
    """The frozen teacher (eval mode, no gradient) of `spec` (`siglip2.checkpoint.load_model`:
    our checkpoint's student or `hf:<folder>`) and a record of where it came from."""
    model, meta = load_model(str(spec), "student")
    record = {"path": str(spec), "stage": meta.stage}
    if meta.stage != "hf":  # a folder records no tokenizer (eval and export use its own)
        record["tokenizer"] = meta.tokenizer
    model.eval().requires_grad_(False)
    record["model"] = model.config.to_dict()
    return model, record


def refit_text_length(tokens: torch.Tensor, length: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """(B, L) padded, EOS-terminated ids -> (B, length), as the tokenizer would have written
    them at `length`: padded on the right, or cut with the last slot EOS when the caption no
    longer fits ("sticky" EOS). A caption already cut at L stays cut."""
    b, cur = tokens.shape
    if length == cur:
        return tokens
    if length > cur:
        return torch.cat([tokens, tokens.new_full((b, length - cur), pad_id)], dim=1)
    out = tokens[:, :length].clone()
    ended = (out == eos_id).any(dim=1)
    out[~ended, -1] = eos_id
    return out


def teacher_inputs(
    teacher_config, image: torch.Tensor, text: torch.Tensor, pad_id: int | None = None, eos_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's batch as the teacher (`SigLIP2Config`) takes it: images (B, 3, S, S)
    resized to its resolution (bilinear, antialiased, on the device) and ids refitted to its
    text length (`refit_text_length`; needs the tokenizer's pad and EOS ids when the lengths differ)."""
    size = int(teacher_config.vision.image_size)
    if tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    length = int(teacher_config.text.max_len)
    if text.shape[1] != length:
        if pad_id is None or eos_id is None:
            raise ValueError(
                f"the teacher's text length {length} differs from the batch's {text.shape[1]}: "
                "the tokenizer's pad and EOS ids are needed to refit the ids"
            )
        text = refit_text_length(text, length, pad_id, eos_id)
    return image, text


class TeacherCache:
    """The frozen teacher's embeddings of every training sample, by sample key (a file
    written by `python -m siglip2.acid cache`). Exact: the teacher is frozen and the
    cached inputs are what training would give a live teacher with `teacher_pixels=source` (each
    source image squashed to the teacher's resolution, the learner's ids), which requires a
    deterministic image transform (no random resized crop). `image_size`: the pixels the
    teacher saw.

    `lookup(keys)` -> (image_emb, text_emb) rows, (N, D) float32; a key the cache lacks is a
    `KeyError` naming how many and which (a cache built from other shards)."""

    def __init__(self, path: str | Path):
        raw = load_plain(path)  # tensors and plain values only: never runs pickled code
        if not isinstance(raw, dict) or raw.get("kind") != "siglip2-teacher-cache":
            raise ValueError(f"{path}: not a teacher cache (write one with python -m siglip2.acid cache)")
        self.path = str(path)
        self.keys: list[str] = list(raw["keys"])
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.image_emb, self.text_emb = raw["image_emb"].float(), raw["text_emb"].float()
        self.logit_scale, self.logit_bias = raw["logit_scale"].float(), raw["logit_bias"].float()
        self.teacher: dict[str, Any] = dict(raw["teacher"])
        self.image_size, self.text_length = int(raw["image_size"]), int(raw["text_length"])
        self.draft_decode = bool(raw.get("draft_decode", True))
        tok = raw.get("tokenizer")
        self.tokenizer: dict[str, Any] | None = tok if isinstance(tok, dict) else None  # path + sha256

    def lookup(self, keys: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [k for k in keys if k not in self.row]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(keys)} samples are not in the teacher cache {self.path} "
                f"(e.g. {missing[:3]}): it was built from other shards"
            )
        rows = torch.tensor([self.row[k] for k in keys])
        return self.image_emb[rows].to(device), self.text_emb[rows].to(device)


@torch.no_grad()
def build_teacher_cache(
    teacher_spec: str,
    urls,
    tokenizer_path: str,
    image_size: int | None,
    text_length: int,
    out: str | Path,
    batch_size: int = 64,
    num_workers: int = 1,
    device: str = "cpu",
    lowercase: bool = True,
    draft_decode: bool = True,
) -> Path:
    """Encode every sample of `urls` once with the teacher: each image decoded and squashed to
    `image_size` px (None: the teacher's own resolution, as it was trained; not the learner's
    pixels resized again), the caption as the learner's `text_length` ids; write a
    `TeacherCache` file.
    `draft_decode` must match the run's `data.draft_decode` (JPEG decoding at a reduced
    scale changes the pixels). Duplicate sample keys are an error (the cache is looked up by key)."""
    # the loader's modules (webdataset, PIL, torchvision) only when a cache is built
    from siglip2.data.samples import TrainSample
    from siglip2.data.shards import build_eval_loader
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.data.transforms import ImageTransform
    from siglip2.eval.precision import eval_precision, tower_autocast

    teacher, record = load_teacher(teacher_spec)
    teacher.to(device)
    tok = build_tokenizer(tokenizer_path, length=int(text_length), lowercase=lowercase)
    check_vocab_size(
        teacher.config.text.vocab_size,
        tok.vocab_size,
        f"the teacher {teacher_spec}",
        f"the tokenizer {tokenizer_path}",
        hint="teacher and learner must share one tokenizer",
    )
    image_size = int(image_size or teacher.config.vision.image_size)
    transform = ImageTransform(image_size)
    sample_fn = TrainSample(tok, transform, seed=0, epoch=0, locca=None)
    loader = build_eval_loader(
        urls,
        sample_fn,
        batch_size=batch_size,
        num_workers=num_workers,
        decode_size=transform.min_source_size() if draft_decode else None,
    )
    keys, images, texts = [], [], []
    with eval_precision(device):  # CUDA: bf16 towers, TF32 matmuls; CPU: fp32 (as evaluation)
        for batch in loader:
            image, text = teacher_inputs(
                teacher.config, batch["image"].to(device), batch["text"].to(device), tok.pad_id, tok.eos_id
            )
            with tower_autocast(device):
                images.append(teacher.encode_image(image=image).embeds.float().cpu())
                texts.append(teacher.embed_text(text).float().cpu())
            keys += list(batch["key"])
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise ValueError(f"duplicate sample keys in {urls} (e.g. {dup}): a teacher cache needs unique keys")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(
        {
            "kind": "siglip2-teacher-cache",
            "keys": keys,
            "image_emb": torch.cat(images),
            "text_emb": torch.cat(texts),
            "logit_scale": teacher.logit_scale.exp().detach().cpu(),
            "logit_bias": teacher.logit_bias.detach().cpu(),
            "teacher": record,
            "image_size": int(image_size),
            "text_length": int(text_length),
            "tokenizer": TokenizerRecord.of(tokenizer_path, tok, full=False).to_dict(),
            "draft_decode": bool(draft_decode),
        },
        tmp,
    )
    tmp.replace(out)
    return out
