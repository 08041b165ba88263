"""`python -m siglip2.export ckpt_path=PATH [format=hf] [out=DIR] [tokenizer=PATH] [which=student|teacher]`.

Turns a training checkpoint (any stage) into a folder `transformers.Siglip2Model.from_pretrained`
loads. Reads it with `siglip2.checkpoint` (no Lightning needed): the configuration of the
weights it holds, and the student's (or the EMA teacher's) weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

from siglip2.checkpoint import read_checkpoint
from siglip2.export.hf import save_hf


def load_checkpoint_model(path: str, which: str = "student"):
    """The student (or EMA teacher) of a training checkpoint, in eval mode."""
    return read_checkpoint(path).model(which)


def main(argv: list[str]) -> Path:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(args) - {"ckpt_path", "format", "out", "tokenizer", "which"}
    if "ckpt_path" not in args or unknown or len(args) != len(argv):
        raise SystemExit(__doc__)
    if args.get("format", "hf") != "hf":
        raise SystemExit(f"format={args['format']!r}: only 'hf' is supported")
    out = Path(args.get("out") or Path(args["ckpt_path"]).with_suffix("").as_posix() + "_hf")
    model = load_checkpoint_model(args["ckpt_path"], args.get("which", "student"))
    folder = save_hf(model, out, tokenizer_dir=args.get("tokenizer"))
    print(f"exported to {folder}")
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
