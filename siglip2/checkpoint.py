"""The one owner of the checkpoint format, without Lightning: what a stage writes
(`CheckpointMeta`), how any checkpoint is read back (`read_checkpoint`, `load_model`) and
upgraded, for `init_from`, eval, export, ACID's teacher and the recipe's chain.

A checkpoint (`trainer.save_checkpoint`, any stage) holds the stage's `state_dict` — the
student under `model.`, the losses' modules under `losses.<name>.` (the LocCa decoder under
`losses.locca.decoder.`), the EMA teacher's image tower under `teacher.vision.` and its heads
under `teacher.heads.<loss>.` when the stage distils — and a
`siglip2` entry that makes it usable on its own: the configuration of the weights it holds
(after any adaptation), the losses' configs, the loss phase and the recipe's clock
(`CheckpointMeta`, written by `stages.base.Stage.checkpoint_meta`).

A model is named by a *spec*: a checkpoint file, a DeepSpeed checkpoint folder, or
`hf:<folder>`, a transformers `SiglipModel` / `Siglip2Model` folder (`split_spec`).

Every file we read back (checkpoints here and for Lightning's resume, ACID's teacher cache,
the recipe's summaries) goes through `load_plain`: tensors and plain Python values only, never
pickled code.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from siglip2.model import SigLIP2, SigLIP2Config

# 3: the optimiser's parameter groups also split by lr gate (dormant losses, frozen prototypes),
# so the optimiser state of formats 1-2 does not fit: such checkpoints load weights (init_from,
# eval, export) but cannot resume.
CHECKPOINT_FORMAT = 3
# Renamed since format 1 (old name prefix -> new), so earlier checkpoints keep loading.
_RENAMED = {"locca.": "losses.locca."}
HF_PREFIX = "hf:"


def split_spec(spec: str | Path) -> tuple[str, str]:
    """("hf", folder) for `hf:<folder>` (a transformers folder), else ("ckpt", path): the one
    parser of the prefix."""
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        return "hf", spec[len(HF_PREFIX) :]
    return "ckpt", spec


def load_plain(path: str | Path, *, mmap: bool = False) -> Any:
    """`torch.load` of a file that holds only tensors and plain Python values (dict, list,
    tuple, str, int, float, bool, None), on the CPU: `weights_only=True`, so nothing in the
    file can run code while it is read. Everything we write is of that kind.

    A file that needs more (pickled objects: classes, functions, OmegaConf nodes, enums,
    paths) is refused with a `ValueError` naming the file and what it would have run, before
    any of it is built. `mmap=True` maps the tensors instead of reading them (a cheap look
    at a large file); legacy (non-zip) files are read whole.
    """
    path = str(path)
    if mmap and not zipfile.is_zipfile(path):
        mmap = False
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(err))
        reason = (found.group(1) if found else str(err).splitlines()[0]).strip().rstrip(".")
        raise ValueError(
            f"{path}: refused: this file holds more than tensors and plain Python values, and loading it would "
            f"execute pickled code, which can run anything ({reason}). Our checkpoints and teacher caches hold "
            "only plain values; a file from elsewhere must be converted by someone who trusts it (torch.load with "
            "weights_only=False, keep the tensors and plain values, torch.save)"
        ) from None


def upgrade_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 stage state_dict with today's names (`locca.*` -> `losses.locca.*`)."""
    out = {}
    for key, value in state.items():
        for old, new in _RENAMED.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


@dataclass
class CheckpointMeta:
    """The `siglip2` entry of a checkpoint: what makes it usable without the run's config.

    `stage`: the stage's name (`ckpt_path` resumes only the same stage); `model`: the
    `SigLIP2Config` of the weights held, after any adaptation, as a dict; `losses`: each loss's
    config dict; `loss_enabled`: the loss phase; `examples_seen`: the stage's examples, all
    ranks; `recipe`: the recipe's clock (`examples` = the recipe's length, `window`, `stretch`,
    `progress`); `init_from`: what `init_from` loaded (`siglip2.weights`); `tokenizer`: the
    `TokenizerRecord` dict of the run's tokenizer; `extra`: a stage's own entries (ACID:
    `acid`). Format 1 kept the losses in Lightning's hyper_parameters; `read` upgrades it."""

    stage: str | None
    model: dict[str, Any] | None = None
    losses: dict[str, Any] = field(default_factory=dict)
    loss_enabled: dict[str, bool] = field(default_factory=dict)
    examples_seen: int | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    init_from: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    format: int = CHECKPOINT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = (
        "format",
        "stage",
        "model",
        "losses",
        "loss_enabled",
        "examples_seen",
        "recipe",
        "init_from",
        "tokenizer",
    )

    def to_dict(self) -> dict[str, Any]:
        """The stored form (plain values only: `load_plain` reads it back)."""
        return {**{k: getattr(self, k) for k in self._FIELDS}, **self.extra}

    @classmethod
    def read(cls, raw: Mapping[str, Any]) -> "CheckpointMeta":
        """From a whole checkpoint dict (its `siglip2` entry, upgraded from formats 1-2); a
        checkpoint with no entry gives `stage=None` and format 1."""
        meta = dict(raw.get("siglip2") or {})
        losses = meta.get("losses")
        if losses is None:  # format 1 kept the loss specs only in Lightning's hyper_parameters
            losses = (raw.get("hyper_parameters") or {}).get("losses") or {}
        seen = meta.get("examples_seen")
        return cls(
            stage=meta.get("stage"),
            model=meta.get("model"),
            losses=dict(losses),
            loss_enabled=dict(meta.get("loss_enabled") or {}),
            examples_seen=int(seen) if seen is not None else None,
            recipe=dict(meta.get("recipe") or {}),
            init_from=meta.get("init_from"),
            tokenizer=meta.get("tokenizer"),
            format=int(meta.get("format", 1)),
            extra={k: v for k, v in meta.items() if k not in cls._FIELDS},
        )

    @property
    def model_config(self) -> SigLIP2Config:
        return SigLIP2Config.from_dict(self.model)

    @property
    def recipe_examples(self) -> int | None:
        """The recipe's length in examples, as this checkpoint's clock counted it."""
        return self.recipe.get("examples")

    def check_resumable(
        self, stage: str, model_config: SigLIP2Config, has_optimizer_state: bool, tokenizer: Any = None
    ) -> None:
        """`ckpt_path` resumes the same run: the same stage, the same model (another resolution,
        patch size or architecture is named), the same token ids (`tokenizer`: the run's
        `TokenizerRecord`, if known), and an optimiser state that fits today's parameter groups
        (formats 1-2 do not). Raises `ValueError` saying what to use instead."""
        from siglip2.model.adapt import architecture_differences

        if self.stage not in (None, stage):
            raise ValueError(
                f"ckpt_path resumes the same stage, but this checkpoint is from stage '{self.stage}' "
                f"and this run is stage '{stage}'. Use init_from=... to start a new stage from it."
            )
        diff = architecture_differences(self.model_config, model_config) if self.model is not None else {}
        if diff:
            raise ValueError(
                "ckpt_path resumes the same run, but the checkpoint's model differs from this run's in "
                + ", ".join(f"{k} ({a} in the checkpoint, {b} here)" for k, (a, b) in diff.items())
                + ". To continue these weights at another resolution, start a stage from them with init_from=..."
            )
        if tokenizer is not None:
            tokenizer.check(self.tokenizer, "ckpt_path")
        if self.format < 3 and has_optimizer_state:
            raise ValueError(
                f"ckpt_path: this checkpoint is format {self.format}, written before the optimiser's parameter groups "
                "were split by lr gate (format 3), so its optimiser state does not fit this version and the run cannot "
                "resume exactly. Continue its weights with init_from=<ckpt> and stage.clock.examples / the same stage "
                "window instead (a new optimiser, the clock from the checkpoint)."
            )

    def released_layout(self, warn=None) -> str | None:
        """ "naflex" / "fixed" when the weights came from a transformers folder (`init_from=hf:...`,
        e.g. `experiment=finetune`): a `Siglip2Model` or a `SiglipModel`, as recorded when it was
        loaded (older checkpoints: read from the folder if it is still there; `warn(message)`
        if not); None for any other origin."""
        import json

        record = self.init_from or {}
        kind_of, where = split_spec(str(record.get("path") or ""))
        if kind_of != "hf":
            return None
        kind = record.get("model_type")
        if kind is None:
            config = Path(where) / "config.json"
            if not config.is_file():
                if warn is not None:
                    warn(
                        f"the checkpoint started from {record.get('path')}, which is not there any more: its layout "
                        "is unknown, so the export follows the stage (format=siglip2 or siglip to choose)"
                    )
                return None
            kind = json.loads(config.read_text()).get("model_type")
        return {"siglip2": "naflex", "siglip": "fixed"}.get(kind)


@dataclass
class Checkpoint:
    """A read checkpoint. `state_dict`: the whole stage's tensors (today's names)."""

    path: str
    stage: str
    model_config: SigLIP2Config
    loss_configs: dict[str, dict[str, Any]]
    state_dict: dict[str, torch.Tensor]
    meta: CheckpointMeta = field(default_factory=lambda: CheckpointMeta(stage=None))

    def __post_init__(self):
        if not isinstance(self.meta, CheckpointMeta):  # a stored `siglip2` entry as a dict
            self.meta = CheckpointMeta.read({"siglip2": dict(self.meta or {})})

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix` (e.g. "model."), with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}

    def model(self, which: str = "student") -> SigLIP2:
        """The two-tower model in eval mode: `student` (the trained weights) or `teacher`
        (the EMA teacher of self-distillation, when the stage has one)."""
        if which not in ("student", "teacher"):
            raise ValueError(f"which must be 'student' or 'teacher', got {which!r}")
        state = self.weights("model.")
        if which == "teacher":
            # The EMA teacher is an image tower (SILC); its text side is the student's.
            vision = self.weights("teacher.vision.")
            if not vision:
                raise ValueError(
                    f"{self.path}: no teacher weights in this checkpoint (stage {self.stage!r} "
                    "has no EMA teacher: self-distillation is not configured)"
                )
            if not self.meta.loss_enabled.get("local_to_global", True) and not self.meta.loss_enabled.get(
                "masked", True
            ):
                raise ValueError(
                    f"{self.path}: the teacher was never switched on (checkpoint from before "
                    "self-distillation started): it is a copy of the initial student"
                )
            state = {**state, **{f"vision_model.{k}": v for k, v in vision.items()}}
        if not state:
            raise ValueError(f"{self.path}: no model weights in this checkpoint")
        model = SigLIP2(self.model_config)
        model.load_state_dict(state, strict=True)
        return model.eval()

    def locca_decoder(self):
        """The LocCa decoder in eval mode, or None if the stage had no LocCa loss."""
        if "locca" not in self.loss_configs:
            return None
        from siglip2.config import from_dict
        from siglip2.losses.locca import LoccaConfig, LoccaHead

        head = LoccaHead.for_model(
            from_dict(LoccaConfig, self.loss_configs["locca"], "losses.locca"), self.model_config
        )
        head.decoder.load_state_dict(self.weights("losses.locca.decoder."), strict=True)
        return head.decoder.eval()

    def trained_layout(self) -> str:
        """ "naflex" for a NaFlex stage's weights (aspect-preserving patch sequences), else "fixed"."""
        return "naflex" if self.stage == "naflex" else "fixed"

    @property
    def image_size(self) -> int:
        return int(self.model_config.vision.image_size)


def read_hf_folder(folder: str) -> Checkpoint:
    """A transformers folder (`SiglipModel` or `Siglip2Model`: a released `google/siglip2-*`
    download or our export) as a `Checkpoint` of stage "hf": the two towers, logit scale and
    bias (`siglip2.export.hf.from_hf`: a fixed-resolution model keeps its own image size, a
    multiple of the patch or not); no loss modules, no recorded tokenizer (the folder's own is
    used by eval.py). Raises `ValueError` for another kind of model."""
    from siglip2.export.hf import from_hf

    model = from_hf(folder)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    return Checkpoint(
        path=f"{HF_PREFIX}{folder}",
        stage="hf",
        model_config=model.config,
        loss_configs={},
        state_dict=state,
        meta=CheckpointMeta(stage="hf"),
    )


def read_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint written by any stage (formats 1-3) on the CPU; `hf:<folder>` reads a
    transformers folder (`read_hf_folder`).

    Raises `ValueError` if the file is not a siglip2 stage checkpoint, or if it holds more
    than tensors and plain values (`load_plain`: reading it never runs pickled code).
    """
    kind, where = split_spec(path)
    if kind == "hf":
        return read_hf_folder(where)
    raw = _read_raw(path)
    meta = CheckpointMeta.read(raw)
    if meta.model is None or "state_dict" not in raw:
        raise ValueError(f"{path}: not a siglip2 training checkpoint (no 'siglip2' entry with a model config)")
    return Checkpoint(
        path=str(path),
        stage=str(meta.stage),
        model_config=meta.model_config,
        loss_configs=dict(meta.losses),
        state_dict=upgrade_state_dict(raw["state_dict"]),
        meta=meta,
    )


def read_meta(path: str | Path) -> tuple[CheckpointMeta, int]:
    """A checkpoint's `CheckpointMeta` and Lightning's `global_step`, without reading its
    tensors (a file memory-mapped; a DeepSpeed folder's client state only)."""
    if Path(path).is_dir():
        from siglip2.checkpoint_zero import read_zero_client_state

        raw = read_zero_client_state(path)
    else:
        raw = load_plain(path, mmap=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a siglip2 training checkpoint (a {type(raw).__name__}, not a dict)")
    return CheckpointMeta.read(raw), int(raw.get("global_step", 0))


def load_model(spec: str, which: str = "student") -> tuple[SigLIP2, CheckpointMeta]:
    """The two-tower model a spec names, in eval mode on the CPU, with its `CheckpointMeta`:
    one of our checkpoints (`which`: "student" or the EMA "teacher") or `hf:<folder>`.
    Raises `ValueError` as `read_checkpoint` and `Checkpoint.model` do."""
    kind, where = split_spec(spec)
    if kind == "hf":  # the folder's model as transformers stored it (its own dtype), no second copy
        from siglip2.export.hf import from_hf

        if which != "student":
            raise ValueError(f"{spec}: a transformers folder holds one model, not an EMA teacher")
        return from_hf(where).eval(), CheckpointMeta(stage="hf")
    ckpt = read_checkpoint(spec)
    return ckpt.model(which), ckpt.meta


def _read_raw(path: str) -> dict[str, Any]:
    if Path(path).is_dir():  # DeepSpeed's checkpoint directories: fp32 masters from the ZeRO shards
        from siglip2.checkpoint_zero import is_zero_checkpoint, read_zero_checkpoint

        if not is_zero_checkpoint(path):  # a run folder, or its checkpoints/ folder
            found = sorted(Path(path).glob("*.ckpt")) or sorted(Path(path).glob("checkpoints/*.ckpt"))
            hint = (
                f"; it holds {', '.join(str(p) for p in found[:4])}{', ...' if len(found) > 4 else ''}" if found else ""
            )
            raise ValueError(
                f"{path} is a folder, not a checkpoint: give a checkpoint file, e.g. <run>/checkpoints/last.ckpt{hint}"
            )
        raw = read_zero_checkpoint(path)
    else:
        raw = load_plain(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a siglip2 training checkpoint (a {type(raw).__name__}, not a dict)")
    return raw
