"""The one reader of our training checkpoints, without Lightning: eval, export and `init_from`.

A checkpoint (`trainer.save_checkpoint`, any stage) holds the stage's `state_dict` — the
student under `model.`, the losses' modules under `losses.<name>.` (the LocCa decoder under
`losses.locca.decoder.`), the EMA teacher's image tower under `teacher.vision.` and its heads
under `teacher.heads.<loss>.` when the stage distils — and a
`siglip2` entry that makes it usable on its own: the configuration of the weights it holds
(after any adaptation), the losses' configs, the loss phase and the recipe's clock
(`stages.base.Stage.checkpoint_meta`).

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

# Renamed since format 1 (old name prefix -> new), so earlier checkpoints keep loading.
_RENAMED = {"locca.": "losses.locca."}


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
            "weights_only=False, keep the tensors and plain values, torch.save)") from None


def upgrade_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 stage state_dict with today's names (`locca.*` -> `losses.locca.*`)."""
    out = {}
    for key, value in state.items():
        for old, new in _RENAMED.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


@dataclass
class Checkpoint:
    """A read checkpoint. `state_dict`: the whole stage's tensors (today's names)."""
    path: str
    stage: str
    model_config: SigLIP2Config
    loss_configs: dict[str, dict[str, Any]]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix` (e.g. "model."), with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}

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
                raise ValueError(f"{self.path}: no teacher weights in this checkpoint (stage {self.stage!r} "
                                 "has no EMA teacher: self-distillation is not configured)")
            if not self.meta.get("loss_enabled", {}).get("local_to_global", True) and \
                    not self.meta.get("loss_enabled", {}).get("masked", True):
                raise ValueError(f"{self.path}: the teacher was never switched on (checkpoint from before "
                                 "self-distillation started): it is a copy of the initial student")
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

        head = LoccaHead.for_model(from_dict(LoccaConfig, self.loss_configs["locca"], "losses.locca"),
                                   self.model_config)
        head.decoder.load_state_dict(self.weights("losses.locca.decoder."), strict=True)
        return head.decoder.eval()

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
    return Checkpoint(path=f"hf:{folder}", stage="hf", model_config=model.config, loss_configs={}, state_dict=state,
                      meta={"stage": "hf"})


def read_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint written by any stage (formats 1 and 2) on the CPU; `hf:<folder>`
    reads a transformers folder (`read_hf_folder`).

    Raises `ValueError` if the file is not a siglip2 stage checkpoint, or if it holds more
    than tensors and plain values (`load_plain`: reading it never runs pickled code).
    """
    if str(path).startswith("hf:"):
        return read_hf_folder(str(path)[3:])
    if Path(path).is_dir():  # DeepSpeed's checkpoint directories: fp32 masters from the ZeRO shards
        from siglip2.checkpoint_zero import is_zero_checkpoint, read_zero_checkpoint

        if not is_zero_checkpoint(path):  # a run folder, or its checkpoints/ folder
            found = sorted(Path(path).glob("*.ckpt")) or sorted(Path(path).glob("checkpoints/*.ckpt"))
            hint = (f"; it holds {', '.join(str(p) for p in found[:4])}{', ...' if len(found) > 4 else ''}"
                    if found else "")
            raise ValueError(f"{path} is a folder, not a checkpoint: give a checkpoint file, e.g. "
                             f"<run>/checkpoints/last.ckpt{hint}")
        raw = read_zero_checkpoint(path)
    else:
        raw = load_plain(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a siglip2 training checkpoint (a {type(raw).__name__}, not a dict)")
    meta = dict(raw.get("siglip2") or {})
    if "model" not in meta or "state_dict" not in raw:
        raise ValueError(f"{path}: not a siglip2 training checkpoint (no 'siglip2' entry with a model config)")
    hparams = raw.get("hyper_parameters") or {}
    losses = meta.get("losses")
    if losses is None:  # format 1 kept the loss specs only in Lightning's hyper_parameters
        losses = hparams.get("losses") or {}
    return Checkpoint(path=str(path), stage=str(meta.get("stage")), model_config=SigLIP2Config.from_dict(meta["model"]),
                      loss_configs=dict(losses), state_dict=upgrade_state_dict(raw["state_dict"]), meta=meta)
