"""`python -m siglip2.acid cache --teacher T --shards S --tokenizer TOK --text-length L --out FILE [...]`.

ACID's frozen teacher: precompute its embeddings of every sample of a shard set, by sample key
(`siglip2.acid.teacher.build_teacher_cache`), for `stage.acid.teacher_cache`.
"""

from __future__ import annotations

import argparse

from siglip2.acid.teacher import TeacherCache, build_teacher_cache


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m siglip2.acid", description="ACID's frozen teacher: precompute its embeddings of a shard set"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="write the teacher's embeddings of every sample, by key")
    c.add_argument("--teacher", required=True, help="our checkpoint or hf:<Siglip2Model folder>")
    c.add_argument("--shards", required=True, help="the training shard pattern (data.train)")
    c.add_argument("--tokenizer", required=True, help="the run's tokenizer (.model file or folder)")
    c.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="the size the teacher sees each image at (default: its own model.vision.image_size)",
    )
    c.add_argument("--text-length", type=int, required=True, help="the learner's text length (model.text.max_len)")
    c.add_argument("--out", required=True)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--num-workers", type=int, default=1)
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-draft-decode", action="store_true", help="the run sets data.draft_decode=false")
    args = ap.parse_args(argv)
    path = build_teacher_cache(
        args.teacher,
        args.shards,
        args.tokenizer,
        args.image_size,
        args.text_length,
        args.out,
        args.batch_size,
        args.num_workers,
        args.device,
        draft_decode=not args.no_draft_decode,
    )
    cache = TeacherCache(path)
    print(f"teacher cache: {len(cache.keys)} samples -> {path}")


if __name__ == "__main__":
    from siglip2.cli import user_errors

    with user_errors("python -m siglip2.acid"):
        main()
