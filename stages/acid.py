"""ACID distillation [P §2.5]: a small model's last boost, by data a bigger teacher chooses.

`python train.py stage=acid init_from=<student ckpt> stage.acid.teacher=<our ckpt | hf:folder>`
continues a finished model with the sigmoid loss only (no distillation loss: the teacher acts
through the data), lr 1e-5 and no weight decay (`stage.optim_overrides`). Each step the loader
yields a super-batch of b / (1 - f) examples per rank; the learner (no gradient) and the
frozen teacher score every image-text pair of it, and the b examples of highest learnability
(`siglip2.data.curation`: JEST's joint selection by default) train. Selection is per rank, on
the rank's own super-batch, with a generator seeded by (seed, step, rank), so a resumed run
chooses what an uninterrupted one would have.

The teacher may be any size, resolution and text length: the super-batch's images are
resized to its resolution on the device (bilinear, antialiased) and its token ids are cut or
padded to its length (EOS kept, as the tokenizer does). It must share the learner's
tokenizer: another vocabulary size is an error before anything runs. It is kept outside the
module tree: not in the checkpoint (the checkpoint records its path), not in the optimiser,
not wrapped by DDP/FSDP.

Logged under `acid/`: the mean learnability (diagonal) of the chosen vs the whole
super-batch, the learner's and the teacher's sigmoid loss on the super-batch, and the share
of each language's examples that was chosen (`lang` of the sample json; the recipe's data is
90% English). `train/...` and ThroughputMonitor count the trained examples only; the scoring
passes' cost is measured apart (`benchmarks/acid_step.py`).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from siglip2.config import from_dict
from siglip2.data.curation import CurationConfig, select
from siglip2.losses.sigmoid import SigmoidLoss, SigmoidLossConfig, sigmoid_pair_losses
from siglip2.model import SigLIP2
from stages.base import Stage, StepContext

log = logging.getLogger(__name__)


@dataclass
class AcidConfig(CurationConfig):
    """`stage.acid`: the selection (`CurationConfig`: filter ratio, method, chunks) and the
    teacher: `teacher` = one of our checkpoints (its student) or `hf:<folder>` (a
    `transformers.Siglip2Model`); null only with `method=random` or `filter_ratio=0`.
    `score_chunk_size`: rows of the pair-loss matrix formed at a time."""
    teacher: str | None = None
    score_chunk_size: int = 1024


def load_teacher(spec: str) -> tuple[SigLIP2, dict[str, Any]]:
    """The frozen teacher (eval mode, no gradient) and a record of where it came from."""
    if str(spec).startswith("hf:"):
        from siglip2.export.hf import from_hf

        model = from_hf(str(spec)[3:])
        record = {"path": str(spec), "stage": "hf"}
    else:
        from siglip2.checkpoint import read_checkpoint

        ckpt = read_checkpoint(str(spec))
        model = ckpt.model("student")
        record = {"path": str(spec), "stage": ckpt.stage}
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


class AcidStage(Stage):
    NAME = "acid"
    LOSSES = {"sigmoid": SigmoidLossConfig}

    def __init__(self, *args, acid: Mapping[str, Any] | None = None, **kwargs):
        """`acid`: `AcidConfig` keys. The teacher is loaded here, so a wrong path or a
        tokenizer mismatch fails before the data or the Trainer start."""
        self.acid = from_dict(AcidConfig, dict(acid or {}), "stage.acid")
        super().__init__(*args, **kwargs)
        self.hparams["acid"] = dict(acid or {})
        self.teacher_record: dict[str, Any] | None = None
        teacher = None
        scores = self.acid.filter_ratio > 0 and self.acid.method != "random"
        if scores:
            if not self.acid.teacher:
                raise ValueError(f"stage=acid with method={self.acid.method!r} needs a teacher: "
                                 "stage.acid.teacher=<checkpoint> or hf:<folder> (method=random needs none)")
            teacher, self.teacher_record = load_teacher(self.acid.teacher)
            mine, theirs = self.model.config.text.vocab_size, teacher.config.text.vocab_size
            if mine != theirs:
                raise ValueError(f"stage.acid.teacher={self.acid.teacher}: its vocabulary has {theirs} tokens, the "
                                 f"learner's {mine}: teacher and learner must share one tokenizer")
        # Not a submodule: no checkpoint bytes, no optimiser, no DDP/FSDP wrapping.
        self.__dict__["teacher_model"] = teacher

    # ---- the loss ------------------------------------------------------------------------
    def build_loss(self, name: str, cfg) -> torch.nn.Module:
        return SigmoidLoss(chunk_size=int(cfg.chunk_size))

    def loss_inputs(self, name: str, ctx: StepContext) -> dict[str, Any]:
        return dict(image_emb=ctx.image.embeds, text_emb=ctx.text_emb,
                    logit_scale=self.model.logit_scale.exp(), logit_bias=self.model.logit_bias)

    def load_weights(self, path: str) -> None:
        super().load_weights(path)
        # ACID is a run of its own after the main one: its clock is its own steps (or
        # stage.recipe.examples), not the source recipe's length.
        self.init_meta.pop("recipe", None)

    # ---- curation ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.teacher_model is not None:
            self.teacher_model.to(self.device)

    @property
    def trained_batch_size(self) -> int | None:
        """b: the examples trained per rank and step (the data module's `batch_size`; its
        loader yields b / (1 - f)). Settable for use outside a Trainer (benchmarks)."""
        if getattr(self, "_trained_batch_size", None):
            return self._trained_batch_size
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(dm.batch_size) if dm is not None else None

    @trained_batch_size.setter
    def trained_batch_size(self, value: int | None) -> None:
        self._trained_batch_size = value

    def _teacher_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.teacher_model.config
        image, text = batch["image"], batch["text"]
        size = int(t.vision.image_size)
        if tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image.float(), size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=True)
        if text.shape[1] != int(t.text.max_len):
            tok = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
            if tok is None:
                raise ValueError("the teacher's text length differs from the learner's and no tokenizer is known "
                                 "to re-pad the ids (the data module holds it)")
            text = refit_text_length(text, int(t.text.max_len), tok.pad_id, tok.eos_id)
        return image, text

    @torch.no_grad()
    def score(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Pair losses of the super-batch: `learner` and `teacher` (N, N) float32 and their
        difference `learnability`, each model with its own t and b."""
        chunk = int(self.acid.score_chunk_size)
        m = self.model
        learner = sigmoid_pair_losses(m.encode_image(image=batch["image"]).embeds, m.embed_text(batch["text"]),
                                      m.logit_scale.exp(), m.logit_bias, chunk)
        t = self.teacher_model
        image, text = self._teacher_inputs(batch)
        teacher = sigmoid_pair_losses(t.encode_image(image=image).embeds, t.embed_text(text),
                                      t.logit_scale.exp(), t.logit_bias, chunk)
        return {"learner": learner, "teacher": teacher, "learnability": learner - teacher}

    def choose(self, batch: Mapping[str, Any], k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(k,) indices of the super-batch to train on, and the `acid/` metrics."""
        n = int(batch["image"].shape[0])
        gen = self.step_generator()
        if self.acid.method == "random" or self.teacher_model is None:
            return select(None, n, k, self.acid, gen, self.device), {}
        s = self.score(batch)
        idx = select(s["learnability"], n, k, self.acid, gen, self.device)
        diag = s["learnability"].diagonal()
        metrics = {
            "acid/learnability_chosen": diag[idx].mean(),
            "acid/learnability_all": diag.mean(),
            "acid/learner_loss": s["learner"].sum() / n,
            "acid/teacher_loss": s["teacher"].sum() / n,
        }
        return idx, metrics

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "image" not in batch:
            raise ValueError("stage=acid trains on fixed-resolution batches (`image`); NaFlex batches are not supported")
        n = int(batch["image"].shape[0])
        k = self.trained_batch_size or n
        if n < k:
            raise ValueError(f"stage=acid: a super-batch of {n} examples cannot give the batch of {k}")
        if n == k:  # filter_ratio 0: plain continued training
            batch["trained_batch_size"] = n
            return super().training_step(batch, batch_idx)
        idx, metrics = self.choose(batch, k)
        chosen = subset(batch, idx)
        for key, value in metrics.items():
            self.log(key, value, batch_size=k)
        for lang, share in chosen_share(batch.get("lang"), idx.tolist()).items():
            self.log(f"acid/chosen_frac_{lang}", share, batch_size=k)
        batch["trained_batch_size"] = k  # what ThroughputMonitor counts (stages.base.batch_size)
        return super().training_step(chosen, batch_idx)

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["acid"] = {"teacher": self.teacher_record, **{k: v for k, v in self.hparams["acid"].items()
                                                          if k != "teacher"}}
        return meta


def subset(batch: Mapping[str, Any], idx: torch.Tensor) -> dict[str, Any]:
    """The rows `idx` of every batch entry (tensors along dim 0, lists by position)."""
    rows = idx.tolist()
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "trained_batch_size":
            continue
        if torch.is_tensor(value) and value.ndim >= 1:
            out[key] = value.index_select(0, idx.to(value.device))
        elif isinstance(value, (list, tuple)):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


def chosen_share(langs: list[str] | None, rows: list[int], groups: tuple[str, ...] = ("en",)) -> dict[str, float]:
    """Share of each group's super-batch examples that was chosen: `en` and `non_en` (the
    recipe's 90/10 English mix; `unknown` for samples without one); nothing when no sample
    carries a language."""
    if not langs or not any(langs):
        return {}
    name = [lang if lang in groups else ("non_en" if lang else "unknown") for lang in (str(x or "") for x in langs)]
    total, kept = Counter(name), Counter(name[i] for i in rows)
    return {g: kept[g] / total[g] for g in total}
