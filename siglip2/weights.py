"""`init_from`: a stage's weights from one of our checkpoints or a transformers folder, no Lightning.

A stage (any `nn.Module` whose state dict holds the student under `model.`, the losses'
modules under `losses.<name>.` and the EMA teacher under `teacher.`) takes the towers (and
whatever loss modules and teacher the source holds) from a spec (`siglip2.checkpoint.split_spec`):
weights only; the optimiser and the schedule are the new stage's. The image towers are fitted
to the stage's resolution and patch size (`siglip2.model.adapt`); any other difference of the
model (depth, width, vocabulary, text length) is a `ValueError` naming the fields or tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siglip2.checkpoint import CheckpointMeta, read_checkpoint, split_spec
from siglip2.data.tokenizer import TokenizerRecord, check_vocab_size
from siglip2.model.adapt import adapt_vision_weights
from siglip2.model.two_tower import SigLIP2Config

log = logging.getLogger(__name__)


@dataclass
class InitResult:
    """What `init_from` did. `loaded`: the stage's tensor names that came from the source;
    `source`: the source's `CheckpointMeta` (its recipe's clock, tokenizer; stage "hf" for a
    folder); `record`: what the stage's own checkpoints keep under `init_from` (path, stage,
    adaptations, tensors not in the source, tensors ignored; a folder's `model_type`)."""

    loaded: set[str]
    source: CheckpointMeta
    record: dict[str, Any] = field(default_factory=dict)


def init_from(
    stage: nn.Module,
    spec: str,
    model_config: SigLIP2Config,
    *,
    posemb_resize: str = "hf",
    tokenizer: TokenizerRecord | None = None,
) -> InitResult:
    """Load `spec` (our checkpoint of any stage, or `hf:<folder>`) into `stage` in place.

    `model_config`: the stage's own model (what the image towers are adapted to);
    `posemb_resize`: "hf" or "bv_zoom" (`siglip2.model.posemb.resize_posemb`); `tokenizer`: the
    run's `TokenizerRecord` (a checkpoint trained with other token ids, or weights of another
    vocabulary size, are refused naming both). Raises `ValueError` for a source that does not
    fit, or that lacks tensors of the towers themselves (only loss modules and the EMA teacher
    may start fresh)."""
    kind, where = split_spec(spec)
    source_name = f"init_from={spec}"
    mine = int(model_config.text.vocab_size)
    mine_name = f"this run's tokenizer ({tokenizer.path if tokenizer else 'tokenizer.path'})"
    if kind == "hf":
        return _from_hf_folder(stage, where, model_config, posemb_resize, mine, mine_name)
    ckpt = read_checkpoint(spec)
    if tokenizer is not None:
        tokenizer.check(ckpt.meta.tokenizer, source_name)
    check_vocab_size(int(ckpt.model_config.text.vocab_size), mine, source_name, mine_name)
    state, notes = adapt_vision_weights(
        ckpt.state_dict, ckpt.model_config, model_config, posemb_resize=posemb_resize, what=source_name
    )
    own = stage.state_dict()
    check_shapes(own, state, source=source_name, allow_missing=True)
    missing, unexpected = stage.load_state_dict(state, strict=False)
    if len(own) == len(missing):
        raise ValueError(f"{source_name}: no tensor of this stage's model is in the checkpoint")
    towers = [k for k in missing if k.startswith("model.")]
    if towers:  # only the losses' modules and the EMA teacher may start fresh, never the towers
        raise ValueError(
            f"{source_name}: the checkpoint lacks {len(towers)} tensors of the model itself "
            f"({', '.join(towers[:5])}{', ...' if len(towers) > 5 else ''}); only loss modules "
            "(LocCa decoder, distillation heads) and the EMA teacher may start fresh"
        )
    log.info(
        "init_from %s (stage %s): %d tensors loaded, %d not in checkpoint, %d ignored%s",
        spec,
        ckpt.stage,
        len(own) - len(missing),
        len(missing),
        len(unexpected),
        f" (modules this stage does not have: {', '.join(module_prefixes(unexpected))})" if unexpected else "",
    )
    for note in notes:
        log.info("init_from: adapted %s", note)
    record = {
        "path": str(spec),
        "stage": ckpt.stage,
        "adapted": notes,
        "not_in_checkpoint": sorted(missing),
        "ignored": sorted(unexpected),
    }
    return InitResult(loaded=set(own) - set(missing), source=ckpt.meta, record=record)


def _from_hf_folder(
    stage: nn.Module, folder: str, model_config: SigLIP2Config, posemb_resize: str, mine: int, mine_name: str
) -> InitResult:
    """A `transformers` `SiglipModel` / `Siglip2Model` folder (a downloaded `google/siglip2-*`
    or our export) into the towers, logit scale and bias. Everything else (LocCa decoder,
    distillation heads) was never released and starts as built; the log says so. The recipe's
    length is not in the folder: the stage's clock comes from its own steps."""
    from siglip2.checkpoint import read_hf_folder

    ckpt = read_hf_folder(folder)
    source_name = f"init_from=hf:{folder}"
    check_vocab_size(int(ckpt.model_config.text.vocab_size), mine, source_name, mine_name)
    state, notes = adapt_vision_weights(
        ckpt.state_dict,
        ckpt.model_config,
        model_config,
        posemb_resize=posemb_resize,
        prefixes=("model.vision_model.",),
        what=f"HF model {folder}",
    )
    own = stage.state_dict()
    check_shapes(own, state, source=source_name, allow_missing=True)
    missing, _ = stage.load_state_dict(state, strict=False)
    fresh = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in missing if not k.startswith("teacher.")})
    log.info(
        "init_from hf:%s: %d tensors of the two towers loaded; starting fresh (never released): %s",
        folder,
        len(state),
        ", ".join(fresh) or "nothing",
    )
    for note in notes:
        log.info("init_from: adapted %s", note)
    config = Path(folder) / "config.json"  # its layout, for the export back (siglip2.export)
    kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    where = os.path.abspath(folder) if os.path.isdir(folder) else folder
    record = {
        "path": f"hf:{where}",
        "stage": "hf",
        "model_type": kind,
        "adapted": notes,
        "not_in_checkpoint": sorted(missing),
        "ignored": [],
    }
    return InitResult(loaded=set(state), source=CheckpointMeta(stage="hf"), record=record)


def module_prefixes(keys, depth: int = 2) -> list[str]:
    """The distinct leading `depth` name parts of state-dict keys (`teacher.vision`, ...)."""
    return sorted({".".join(k.split(".")[:depth]) for k in keys})


def check_shapes(
    own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], source: str, allow_missing: bool = False
) -> None:
    """Weights from another model size or resolution are a `ValueError` naming the tensors
    (shape mismatches, and unless `allow_missing` the stage's tensors the source lacks)."""
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in other.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [] if allow_missing else [k for k in own if k not in other]
    if bad or missing:
        lines = bad[:20] + [f"{k}: missing from checkpoint" for k in missing[:20]]
        raise ValueError(
            f"{source} does not fit this model ({len(bad)} shape mismatches, "
            f"{len(missing)} missing):\n  " + "\n  ".join(lines)
        )
