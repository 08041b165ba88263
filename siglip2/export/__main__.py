"""`python -m siglip2.export ckpt_path=PATH [format=hf] [out=DIR] [tokenizer=PATH]`.

Turns a training checkpoint (any stage) into a folder `transformers.Siglip2Model.from_pretrained`
loads. Reads the checkpoint with plain torch (no Lightning needed): the model config lives
in the checkpoint's `siglip2` entry, the weights under the `model.` prefix.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from siglip2.export.hf import save_hf
from siglip2.model import build_model


def load_checkpoint_model(path: str):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    meta = checkpoint.get("siglip2")
    if not meta or "model" not in meta:
        raise ValueError(f"{path}: not a siglip2 training checkpoint (no 'siglip2' entry)")
    model = build_model(meta["model"])
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(argv: list[str]) -> Path:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(args) - {"ckpt_path", "format", "out", "tokenizer"}
    if "ckpt_path" not in args or unknown or len(args) != len(argv):
        raise SystemExit(__doc__)
    if args.get("format", "hf") != "hf":
        raise SystemExit(f"format={args['format']!r}: only 'hf' is supported")
    out = Path(args.get("out") or Path(args["ckpt_path"]).with_suffix("").as_posix() + "_hf")
    folder = save_hf(load_checkpoint_model(args["ckpt_path"]), out, tokenizer_dir=args.get("tokenizer"))
    print(f"exported to {folder}")
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
