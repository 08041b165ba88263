"""Read a DeepSpeed ZeRO-1/2 checkpoint directory as one of our checkpoints, without DeepSpeed
and without running pickled code.

Lightning's `DeepSpeedStrategy` saves `last.ckpt`, `frac_0.90.ckpt`, ... as directories:
```
last.ckpt/latest                                      the tag ("checkpoint")
last.ckpt/checkpoint/mp_rank_00_model_states.pt       the module's weights in the training dtype
                                                      (bf16 under bf16), Lightning's client state
                                                      (our `siglip2` meta, hyper_parameters, loops)
                                                      and the layout of the flat groups
last.ckpt/checkpoint/zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                                      rank r's slice of each flat fp32 master group
                                                      (and its optimiser moments)
```
The weights the optimiser actually steps are the fp32 masters, split across the ranks' files.
`read_zero_checkpoint` puts them back together the way `deepspeed.utils.zero_to_fp32` does
(each group's rank slices concatenated, then cut into parameters in the saved order, skipping
the alignment padding), and adds the parameters outside the optimiser (the EMA teacher) and
the buffers from the model-states file. The result has the layout of a Lightning checkpoint
file: `state_dict` plus the client state.

Every file is read with `torch.load(weights_only=True)`. The optimiser files pickle three small
DeepSpeed types besides tensors and plain values (`LossScaler`, `ZeroStageEnum`,
`fragment_address`); they are allowed under their names but bound to inert records here
(`_Record`, `int`), so neither DeepSpeed's code nor anything else runs, and DeepSpeed need not be
installed to read the checkpoint. Any other type is refused, naming it.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"
# What DeepSpeed's engine puts into the model-states file; the rest is Lightning's client state.
_DEEPSPEED_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "frozen_param_fragments",
    "shared_params",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "ds_config",
}
_OPTIM_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class _Record:
    """Stands in for a pickled DeepSpeed object (loss scaler settings, fragment addresses):
    its attributes are restored as plain data; it has no behaviour."""

    def __repr__(self) -> str:
        return f"_Record({self.__dict__})"


# The only non-plain globals DeepSpeed's ZeRO-1/2 optimiser files pickle (deepspeed 0.1x).
_DEEPSPEED_GLOBALS = [
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def is_zero_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint directory (the `latest` tag file or a tag folder with model states)."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob(f"*/{MODEL_STATES}")))


def _tag_dir(path: Path) -> Path:
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
            raise ValueError(f"{path}: the DeepSpeed 'latest' file names {tag!r}, not a tag folder")
        return path / tag
    tags = sorted(p.parent for p in path.glob(f"*/{MODEL_STATES}"))
    if len(tags) != 1:
        raise ValueError(
            f"{path}: a DeepSpeed checkpoint directory needs a 'latest' file or exactly one tag folder "
            f"with {MODEL_STATES}; found {[t.name for t in tags]}"
        )
    return tags[0]


def _load(path: Path, what: str, mmap: bool = True) -> Any:
    try:
        with torch.serialization.safe_globals(_DEEPSPEED_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(err))
        reason = found.group(1).strip() if found else str(err).splitlines()[0]
        raise ValueError(
            f"{path}: refused: this DeepSpeed {what} file holds more than tensors, plain values and the "
            f"DeepSpeed records a ZeRO-1/2 checkpoint has, and loading it would execute pickled code "
            f"({reason})"
        ) from None


def check_zero_checkpoint(path: str | Path) -> None:
    """Every torch file of a DeepSpeed checkpoint directory holds only tensors, plain values and
    DeepSpeed's three records, else `ValueError` naming the file and what it would have run:
    the check before DeepSpeed's own loader (a resume, `ckpt_path`) unpickles the files without
    that limit. Tensors are memory-mapped, so the look costs little."""
    tag = _tag_dir(Path(path))
    if not any(tag.glob("*.pt")):
        raise ValueError(f"{path}: no DeepSpeed state files in {tag}")
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # a torch.save zip or a raw pickle
            _load(file, "state")


def read_zero_client_state(path: str | Path) -> dict[str, Any]:
    """Lightning's client state of a DeepSpeed checkpoint directory (`siglip2` meta,
    `global_step`, `hyper_parameters`, ...) without the weights: a cheap look (memory-mapped)."""
    tag = _tag_dir(Path(path))
    model = _load(tag / MODEL_STATES, "model-states")
    return {k: v for k, v in model.items() if k not in _DEEPSPEED_KEYS}


def read_zero_checkpoint(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed ZeRO-1/2 checkpoint directory as a Lightning checkpoint dict: `state_dict`
    (every parameter in fp32 from the optimiser's master copy, or as saved for parameters
    outside the optimiser; buffers as saved, floating ones in fp32) plus the client state
    Lightning saved with it (`siglip2`, `hyper_parameters`, `global_step`, ...).

    Raises `ValueError` for a ZeRO-3 checkpoint, a missing or extra rank file, or a layout that
    does not add up."""
    path = Path(path)
    tag = _tag_dir(path)
    model_file = tag / MODEL_STATES
    if not model_file.is_file():
        stage3 = sorted(tag.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
        if stage3:
            raise ValueError(
                f"{path}: a DeepSpeed ZeRO-3 checkpoint (parameters partitioned): only ZeRO-1/2 "
                "checkpoints are read here; convert it with the zero_to_fp32.py script saved in it"
            )
        raise ValueError(f"{path}: no {MODEL_STATES} in {tag}: not a DeepSpeed checkpoint")
    model = _load(model_file, "model-states")
    for key in ("module", "param_shapes", "buffer_names"):
        if key not in model:
            raise ValueError(f"{model_file}: not a DeepSpeed model-states file (no {key!r})")

    ranks = {}
    for f in tag.iterdir():
        found = _OPTIM_STATES.search(f.name)
        if found:
            ranks[int(found.group(1))] = f
    if not ranks:
        raise ValueError(f"{path}: no zero_pp_rank_*_optim_states.pt in {tag} (saved without its optimiser state?)")
    groups_by_rank = []
    paddings = None
    for rank in range(len(ranks)):
        if rank not in ranks:
            raise ValueError(f"{path}: the optimiser file of rank {rank} is missing (have ranks {sorted(ranks)})")
        optim = _load(ranks[rank], "optimiser-states")["optimizer_state_dict"]
        stage = int(optim.get("zero_stage", -1))
        if stage not in (1, 2):
            raise ValueError(f"{ranks[rank]}: ZeRO stage {stage}; only ZeRO-1/2 checkpoints are read here")
        world = optim["partition_count"]
        world = max(world) if isinstance(world, (list, tuple)) else int(world)
        if world != len(ranks):
            raise ValueError(f"{path}: saved by {world} ranks but {len(ranks)} optimiser files are there")
        groups_by_rank.append(optim["single_partition_of_fp32_groups"])
        if rank == 0:
            paddings = optim.get("param_alignment_paddings")
        del optim

    state: dict[str, torch.Tensor] = {}
    module = model["module"]
    for name in model["buffer_names"]:
        if name in module:
            buf = module[name]
            state[name] = buf.to(torch.float32, copy=True) if buf.is_floating_point() else buf.clone()
    for name, value in (model.get("frozen_param_fragments") or {}).items():
        state[name] = value.clone()  # parameters outside the optimiser (the EMA teacher): whole, as held
    world = len(groups_by_rank)
    align = 2 * world
    for g, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([groups[g] for groups in groups_by_rank])
        pads = paddings[g] if paddings is not None else None
        if pads is not None and len(pads) != len(shapes):
            raise ValueError(f"{path}: group {g} has {len(shapes)} parameters but {len(pads)} paddings")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            state[name] = flat.narrow(0, offset, numel).view(tuple(shape)).clone()
            offset += numel + (pads[i] if pads is not None else 0)
        # the flat group is padded to a multiple of 2 x world size (as zero_to_fp32 checks)
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise ValueError(
                f"{path}: group {g}: the parameters take {offset} of {flat.numel()} elements: the "
                "optimiser files do not match the model-states layout"
            )
    for alias, source in (model.get("shared_params") or {}).items():
        if source in state:
            state[alias] = state[source]

    missing = sorted(k for k in module if k not in state)
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} tensors of the module were not rebuilt from the ZeRO files "
            f"({', '.join(missing[:5])})"
        )
    state = {k: state[k] for k in module}  # the module's own order
    raw = {k: v for k, v in model.items() if k not in _DEEPSPEED_KEYS}
    raw["state_dict"] = state
    return raw
