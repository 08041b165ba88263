"""`python -m siglip2.export ckpt_path=PATH [format=hf|siglip2|siglip] [out=DIR] [tokenizer=PATH] [which=student|teacher]`.

Turns a training checkpoint (any stage) into a folder transformers loads, with the image
processor of the transform that stage trained with (`format=hf`, the default): a NaFlex
checkpoint as `Siglip2Model` + `Siglip2ImageProcessor` (aspect kept), any other stage's as
`SiglipModel` + `SiglipImageProcessor` (square resize), as Google released SigLIP 2; a
checkpoint that started from a transformers folder (`init_from=hf:`, `experiment=finetune`)
in that folder's layout.
`format=siglip2` / `format=siglip` force one layout (a fixed-resolution model as a
`Siglip2Model` embeds non-square images differently from training: the log says so).
The tokenizer the checkpoint recorded (and its lower-casing) is written so that transformers'
`AutoProcessor` and zero-shot `pipeline` give training's token ids (`tokenizer=` naming another
one is refused; one transformers cannot reproduce is an error naming why).
Reads the checkpoint with `siglip2.checkpoint` (no Lightning needed).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

KEYS = ("ckpt_path", "format", "out", "tokenizer", "which")


def load_checkpoint_model(path: str, which: str = "student"):
    """The student (or EMA teacher) of a training checkpoint, in eval mode."""
    from siglip2.checkpoint import load_model

    return load_model(path, which)[0]


def parse_args(argv: list[str]) -> dict[str, str]:
    """`key=value` arguments; raises SystemExit naming a bare word, an unknown key (with the
    closest known one) or a missing ckpt_path, before anything heavy is imported."""
    if not argv or any(a in ("-h", "--help") for a in argv):
        raise SystemExit(__doc__)
    problems, args = [], {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq:
            problems.append(f"'{a}' is not key=value (keys: {', '.join(KEYS)})")
        elif key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            problems.append(
                f"unknown key '{key}'"
                + (f" (did you mean '{close[0]}'?)" if close else "")
                + f"; keys: {', '.join(KEYS)}"
            )
        else:
            args[key] = value
    if "ckpt_path" not in args and not problems:
        problems.append("ckpt_path=<checkpoint> is required")
    if problems:
        raise SystemExit("python -m siglip2.export: error: " + "; ".join(problems))
    return args


def main(argv: list[str]) -> Path:
    args = parse_args(argv)
    print(f"reading {args['ckpt_path']} ...", file=sys.stderr, flush=True)  # torch's import: seconds
    from siglip2.checkpoint import read_checkpoint
    from siglip2.export.hf import save_hf

    fmt = args.get("format", "hf")
    if fmt not in ("hf", "siglip2", "siglip"):
        raise SystemExit(f"format={fmt!r}: one of hf (by the checkpoint's stage), siglip2, siglip")
    out = Path(args.get("out") or Path(args["ckpt_path"]).with_suffix("").as_posix() + "_hf")
    ckpt = read_checkpoint(args["ckpt_path"])
    trained = ckpt.trained_layout()
    released = ckpt.meta.released_layout(warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    if fmt == "hf" and released and released != trained:  # a fine-tuned release: its own layout back
        print(
            f"the checkpoint started from {ckpt.meta.init_from['path']}, a "
            f"{'Siglip2Model' if released == 'naflex' else 'SiglipModel'}: exporting that layout"
            + (
                " (trained on square images: non-square ones embed differently from training)"
                if released == "naflex"
                else ""
            ),
            file=sys.stderr,
        )
        trained = released
    preprocessing = {"hf": trained, "siglip2": "naflex", "siglip": "fixed"}[fmt]
    if preprocessing != trained:
        print(
            f"warning: stage {ckpt.stage!r} trained with the {trained} transform; this export's processor applies "
            f"the {preprocessing} one, so non-square images embed differently from training",
            file=sys.stderr,
        )
    model = ckpt.model(args.get("which", "student"))
    tokenizer = args.get("tokenizer")
    record = ckpt.meta.tokenizer
    if record or tokenizer:  # the checkpoint's own tokenizer; another one named here is refused
        from siglip2.data.tokenizer import resolve_checkpoint_tokenizer

        tokenizer = resolve_checkpoint_tokenizer(
            record, tokenizer, explicit=tokenizer is not None, what=f"checkpoint {args['ckpt_path']}"
        )
    lowercase = bool((record or {}).get("lowercase", True))  # as training read its captions
    folder = save_hf(model, out, tokenizer_dir=tokenizer, preprocessing=preprocessing, lowercase=lowercase)
    kind = "Siglip2Model + Siglip2ImageProcessor" if preprocessing == "naflex" else "SiglipModel + SiglipImageProcessor"
    print(f"exported to {folder} ({kind}; transformers AutoModel loads it)")
    return folder


if __name__ == "__main__":
    from siglip2.cli import user_errors

    with user_errors("python -m siglip2.export"):  # a wrong path or tokenizer: one line, exit 1
        main(sys.argv[1:])
