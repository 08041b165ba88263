"""ACID distillation [P §2.5]: a small model's last boost, by data a bigger teacher chooses.

`python train.py stage=acid init_from=<student ckpt> stage.acid.teacher=<our ckpt | hf:folder>`
continues a finished model with the sigmoid loss only (no distillation loss: the teacher acts
through the data), lr 1e-5 and no weight decay (`stage.optim_overrides`). Each step the loader
yields a super-batch of b / (1 - f) examples per rank; the learner (no gradient) and the
frozen teacher score every image-text pair of it, and the b examples of highest learnability
(`siglip2.acid`: JEST's joint selection by default) train. Selection is per rank, on
the rank's own super-batch, with a generator seeded by (seed, step, rank), so a resumed run
chooses what an uninterrupted one would have.

The teacher may be any size, resolution and text length. Its images: with
`stage.acid.teacher_pixels=source` (the default) the loader squashes each source image a second
time, to the teacher's resolution (`teacher_image`, as the cache builder does), so a 384 px
teacher of a 256 px learner scores pixels as it was trained on, not the learner's upsampled
again; `batch` resizes the learner's batch on the device instead (bilinear, antialiased: no
extra loader work, a blurrier view for a bigger teacher, which biases its losses and so the
ranking). Its token ids are cut or padded to its length (EOS kept, as the tokenizer does). It must share the learner's
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

from siglip2.acid import CurationConfig, TeacherCache, load_teacher, select, teacher_inputs
from siglip2.config import from_dict
from siglip2.data.tokenizer import check_vocab_size
from siglip2.data.transforms import normalize_pixels
from siglip2.losses.sigmoid import SigmoidLoss, SigmoidLossConfig, negative_weight, sigmoid_pair_losses
from stages.base import Stage, StepContext

log = logging.getLogger(__name__)


@dataclass
class AcidConfig(CurationConfig):
    """`stage.acid`: the selection (`CurationConfig`: filter ratio, method, chunks) and the
    teacher: `teacher` = one of our checkpoints (its student) or `hf:<folder>` (a
    `transformers.Siglip2Model`); null only with `method=random` or `filter_ratio=0`, or
    with `teacher_cache`: a file of the teacher's embeddings of every training sample
    (`python -m siglip2.acid cache`), read instead of running the teacher.
    `score_chunk_size`: rows of the pair-loss matrix formed at a time. `teacher_pixels`: what a
    live teacher of another resolution sees, `source` (each image squashed from the source to its
    size by the loader) or `batch` (the learner's pixels resized on the device)."""

    teacher: str | None = None
    teacher_cache: str | None = None
    score_chunk_size: int = 1024
    teacher_pixels: str = "source"

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_pixels not in ("source", "batch"):
            raise ValueError(f"stage.acid.teacher_pixels must be source or batch, got {self.teacher_pixels!r}")


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
        teacher, self.teacher_cache = None, None
        scores = self.acid.filter_ratio > 0 and self.acid.method != "random"
        if scores and self.acid.teacher_cache:
            self.teacher_cache = TeacherCache(self.acid.teacher_cache)
            self.teacher_record = {**self.teacher_cache.teacher, "cache": self.acid.teacher_cache}
            theirs = self.teacher_cache.teacher["model"]["text"]["vocab_size"]
            t = self.model.config.text
            if self.teacher_cache.text_length != t.max_len:
                raise ValueError(
                    f"stage.acid.teacher_cache={self.acid.teacher_cache} was built for a learner of "
                    f"{self.teacher_cache.text_length} tokens; this one has {t.max_len}"
                )
        elif scores:
            if not self.acid.teacher:
                raise ValueError(
                    f"stage=acid with method={self.acid.method!r} needs a teacher: "
                    "stage.acid.teacher=<checkpoint> or hf:<folder>, or stage.acid.teacher_cache=<file> "
                    "(method=random needs none)"
                )
            teacher, self.teacher_record = load_teacher(self.acid.teacher)
            theirs = teacher.config.text.vocab_size
        if scores:
            check_vocab_size(
                theirs,
                self.model.config.text.vocab_size,
                f"stage.acid.teacher={self.acid.teacher_cache or self.acid.teacher}",
                "the learner",
                hint="teacher and learner must share one tokenizer",
            )
        # Not a submodule: no checkpoint bytes, no optimiser, no DDP/FSDP wrapping.
        self.__dict__["teacher_model"] = teacher

    # ---- the loss ------------------------------------------------------------------------
    def build_loss(self, name: str, cfg) -> torch.nn.Module:
        return SigmoidLoss(chunk_size=int(cfg.chunk_size))

    def loss_inputs(self, name: str, ctx: StepContext) -> dict[str, Any]:
        return dict(
            image_emb=ctx.image.embeds,
            text_emb=ctx.text_emb,
            logit_scale=self.model.logit_scale.exp(),
            logit_bias=self.model.logit_bias,
            nominal_batch_size=self.sigmoid_nominal(),
        )

    def load_weights(self, path: str) -> None:
        super().load_weights(path)
        # ACID is a run of its own after the main one: its clock is its own steps (or
        # stage.clock.examples), not the source recipe's length.
        if self.init_source is not None:
            self.init_source.recipe = {}

    # ---- curation ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """A live teacher of another resolution with `teacher_pixels=source`: ask the loader for
        `teacher_image` at its size (before the loaders are built)."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.teacher_model is None or dm is None:
            return
        size, own = int(self.teacher_model.config.vision.image_size), int(self.model.config.vision.image_size)
        if size == own:
            return
        if self.acid.teacher_pixels == "batch":
            log.info(
                "ACID teacher at %d px scores the learner's %d px batch resized on the device "
                "(stage.acid.teacher_pixels=batch)",
                size,
                own,
            )
            return
        if getattr(dm, "random_resized_crop", False) or getattr(dm, "naflex", None) is not None:
            raise ValueError(
                "stage.acid.teacher_pixels=source squashes each source image to the teacher's size, "
                "but the learner's images are random crops or NaFlex sequences: the teacher would see "
                "other pixels. Set stage.acid.teacher_pixels=batch"
            )
        dm.teacher_image_size = size
        log.info(
            "ACID teacher at %d px scores each image squashed from the source to %d px (the learner's: %d px)",
            size,
            size,
            own,
        )

    def on_fit_start(self) -> None:
        if self.teacher_model is not None:
            self.teacher_model.to(self.device)
        mine = self.tokenizer_record
        if mine is not None and self.teacher_record:  # same size is not enough: same ids
            mine.check(self.teacher_record.get("tokenizer"), f"stage.acid.teacher={self.acid.teacher}")
        if mine is not None and self.teacher_cache is not None:  # the ids the cache was encoded from
            mine.check(self.teacher_cache.tokenizer, f"stage.acid.teacher_cache={self.acid.teacher_cache}")
        if self.teacher_record:
            log.info("ACID teacher: %s", self.teacher_record.get("cache") or self.teacher_record.get("path"))
        dm = getattr(self.trainer, "datamodule", None)
        if self.teacher_cache is not None and getattr(dm, "random_resized_crop", False):
            raise ValueError(
                "stage.acid.teacher_cache holds the teacher's embeddings of each sample's one "
                "deterministic view; data.random_resized_crop=true gives other views: run the teacher "
                "(stage.acid.teacher) instead"
            )
        if self.teacher_cache is not None and float(getattr(dm, "caption_noise", 0.0) or 0.0) > 0.0:
            raise ValueError(
                "stage.acid.teacher_cache holds the teacher's embedding of each sample's own caption, "
                f"and data.caption_noise={dm.caption_noise} replaces captions with other samples' "
                "(a different one each epoch): run the teacher (stage.acid.teacher) instead"
            )
        if (
            self.teacher_cache is not None
            and bool(getattr(dm, "draft_decode", True)) != self.teacher_cache.draft_decode
        ):
            raise ValueError(
                f"stage.acid.teacher_cache was built with draft decoding "
                f"{'on' if self.teacher_cache.draft_decode else 'off'} and data.draft_decode is "
                f"{getattr(dm, 'draft_decode', True)}: the cached pixels are not training's"
            )

    @property
    def trained_batch_size(self) -> int | None:
        """b: the examples trained per rank and step (the data module's `batch_size`; its
        loader yields b / (1 - f)). Settable for use outside a Trainer (benchmarks)."""
        if self.__dict__.get("_trained_batch_size"):
            return self.__dict__["_trained_batch_size"]
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(dm.batch_size) if dm is not None else None

    @trained_batch_size.setter
    def trained_batch_size(self, value: int | None) -> None:
        self.__dict__["_trained_batch_size"] = value

    def _teacher_embeddings(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(list(batch["key"]), self.device)
        tok = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None) if self._trainer else None
        image = batch.get("teacher_image", batch["image"])  # teacher_pixels=source: at its own size
        image, text = teacher_inputs(
            self.teacher_model.config, image, batch["text"], getattr(tok, "pad_id", None), getattr(tok, "eos_id", None)
        )
        return self.teacher_model.encode_image(image=image).embeds, self.teacher_model.embed_text(text)

    def _teacher_logits_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher_cache is not None:
            return self.teacher_cache.logit_scale.to(self.device), self.teacher_cache.logit_bias.to(self.device)
        return self.teacher_model.logit_scale.exp(), self.teacher_model.logit_bias

    @torch.no_grad()
    def score(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Pair losses of the super-batch: `learner` and `teacher` (N, N) float32 and their
        difference `learnability`, each model with its own t and b."""
        chunk = int(self.acid.score_chunk_size)
        m = self.model
        batch = normalize_pixels(batch)
        learner = sigmoid_pair_losses(
            m.encode_image(image=batch["image"]).embeds,
            m.embed_text(batch["text"]),
            m.logit_scale.exp(),
            m.logit_bias,
            chunk,
        )
        image_emb, text_emb = self._teacher_embeddings(batch)
        teacher = sigmoid_pair_losses(image_emb, text_emb, *self._teacher_logits_params(), chunk)
        return {"learner": learner, "teacher": teacher, "learnability": learner - teacher}

    def choose(self, batch: Mapping[str, Any], k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(k,) indices of the super-batch to train on, and the `acid/` metrics."""
        n = int(batch["image"].shape[0])
        gen = self.step_generator()
        if self.acid.method == "random" or (self.teacher_model is None and self.teacher_cache is None):
            return select(None, n, k, self.acid, gen, self.device), {}
        s = self.score(batch)
        idx = select(s["learnability"], n, k, self.acid, gen, self.device)
        diag = s["learnability"].diagonal()
        # The super-batch's sigmoid losses at the trained batch's scale (each negative weighted
        # by (k - 1)/(n - 1): `negative_weight`), comparable with train/loss_sigmoid.
        w = negative_weight(n, k)
        metrics = {
            "acid/learnability_chosen": diag[idx].mean(),
            "acid/learnability_all": diag.mean(),
            "acid/learner_loss": _as_batch_of(s["learner"], w),
            "acid/teacher_loss": _as_batch_of(s["teacher"], w),
        }
        return idx, metrics

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "image" not in batch:
            raise ValueError(
                "stage=acid trains on fixed-resolution batches (`image`); NaFlex batches are not supported"
            )
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
        for group, share in noisy_share(batch.get("caption_noisy"), idx).items():
            self.log(f"acid/chosen_frac_{group}", share, batch_size=k)
        batch["trained_batch_size"] = k  # what ThroughputMonitor counts (stages.base.batch_size)
        return super().training_step(chosen, batch_idx)

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["acid"] = {
            "teacher": self.teacher_record,
            **{k: v for k, v in self.hparams["acid"].items() if k != "teacher"},
        }
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


def noisy_share(noisy: torch.Tensor | None, idx: torch.Tensor) -> dict[str, float]:
    """Share of the super-batch's `noisy` and `clean` examples that was chosen, from the
    loader's (n,) bool `caption_noisy` (`data.caption_noise`); a group with no example in the
    super-batch is left out, and nothing without the flag. Random subsampling keeps 1 - f of
    each; a teacher that tells matched from mismatched pairs keeps fewer noisy ones."""
    if not torch.is_tensor(noisy) or noisy.ndim != 1:
        return {}
    noisy = noisy.bool().cpu()
    chosen = torch.zeros_like(noisy)
    chosen[idx.cpu()] = True
    out = {}
    for name, members in (("noisy", noisy), ("clean", ~noisy)):
        if members.any():
            out[name] = float((chosen & members).sum()) / float(members.sum())
    return out


def _as_batch_of(pair_losses: torch.Tensor, neg_weight: float) -> torch.Tensor:
    """The sigmoid loss of an (n, n) pair-loss matrix with each negative weighted by
    `neg_weight`: (diagonal + neg_weight * off-diagonal) / n."""
    pos = pair_losses.diagonal().sum()
    return (pos + neg_weight * (pair_losses.sum() - pos)) / pair_losses.shape[0]
