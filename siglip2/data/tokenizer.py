"""Text tokenization the way the SigLIP 2 recipe does it.

big_vision's pipeline is ``lower | tok(length=64, model="gemma", bos="no", eos="sticky")``:
lower-case, no BOS, EOS appended, padded to a fixed length, and when a caption is too long
it is cut so that the *last* token is still EOS ("sticky"). The text tower pools the last
position, so a truncated caption must still end in EOS to look like every other caption.

Three sources are accepted, none fetched from a hub:
- a SentencePiece ``.model`` file (Gemma's ``tokenizer.model`` as is: pad 0, eos 1, bos 2),
- a local Hugging Face tokenizer folder (e.g. a downloaded ``google/siglip2-*`` folder),
- the demo's own SentencePiece model, made by :func:`train_sentencepiece`.

Pad id: the model's own pad piece when it has one (Gemma and our demo model: 0). A model
without a pad piece is padded with id 0, as big_vision does; in SentencePiece models without
pad, id 0 is ``<unk>``, which never collides with EOS. Only if the model's EOS is itself 0
do we pad with EOS. ``decode`` stops at the first EOS, so whatever follows it is never read.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Tokenizer", "TokenizerRecord", "build_tokenizer", "check_vocab_size", "train_sentencepiece"]

log = logging.getLogger(__name__)


class Tokenizer:
    """Lower-case, encode, append EOS, pad/truncate to ``length`` (EOS sticky).

    Subclasses only supply ``_encode_raw`` (text -> ids, no special tokens) and
    ``_decode_raw`` (ids -> text); everything the recipe cares about lives here.
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    length: int

    def __init__(
        self, *, vocab_size: int, pad_id: int, eos_id: int, length: int = 64, lowercase: bool = True, path: str = ""
    ):
        if length < 1:
            raise ValueError(f"tokenizer length must be >= 1, got {length}")
        self.vocab_size = int(vocab_size)
        self.pad_id = int(pad_id)
        self.eos_id = int(eos_id)
        self.length = int(length)
        self.lowercase = bool(lowercase)
        self.path = path

    # -- backend hooks -------------------------------------------------------------------
    def _encode_raw(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_raw(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _encode_raw_batch(self, texts: list[str]) -> list[list[int]]:
        """Backends with a batch call (SentencePiece, HF fast tokenizers) override this."""
        return [self._encode_raw(t) for t in texts]

    # -- public API ----------------------------------------------------------------------
    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of ``text`` (lower-cased if configured), EOS appended, no padding."""
        return self.encode_batch([text], add_eos=add_eos)[0]

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[list[int]]:
        """``[encode(t, add_eos) for t in texts]`` in one call of the backend's batch encoder
        (what the training loader uses: one call per batch, not per sample)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"expected str, got {type(t).__name__}")
        if self.lowercase:
            texts = [t.lower() for t in texts]
        out = self._encode_raw_batch(texts) if texts else []
        if add_eos:
            for ids in out:
                ids.append(self.eos_id)
        return out

    def __call__(self, texts: str | Sequence[str], length: int | None = None) -> torch.LongTensor:
        """(B, L) int64 ids; a single string gives B = 1. One batch call of the backend."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.length if length is None else int(length)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(self.encode_batch(texts, add_eos=True)):
            if len(ids) > length:
                ids = ids[: length - 1] + [self.eos_id]  # eos="sticky"
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first EOS, padding dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i == self.pad_id:
                continue
            kept.append(i)
        return self._decode_raw(kept)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"pad_id={self.pad_id}, eos_id={self.eos_id}, length={self.length}, "
            f"lowercase={self.lowercase})"
        )


def _choose_pad(pad_id: int | None, eos_id: int) -> int:
    """See the module docstring: the model's pad, else 0, else (EOS == 0) EOS."""
    if pad_id is not None and pad_id >= 0:
        return pad_id
    return 0 if eos_id != 0 else eos_id


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (Gemma's, T5's, or ours)."""

    def __init__(self, path: str, length: int = 64, lowercase: bool = True):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                proto = f.read()
            sp.LoadFromSerializedProto(proto)
        except OSError:
            raise
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on garbage
            raise ValueError(f"not a readable SentencePiece model: {path} ({e})") from e
        eos = sp.eos_id()
        if eos < 0:
            raise ValueError(f"SentencePiece model {path} has no EOS piece; the recipe needs one")
        self.sp = sp
        super().__init__(
            vocab_size=sp.get_piece_size(),
            pad_id=_choose_pad(sp.pad_id(), eos),
            eos_id=eos,
            length=length,
            lowercase=lowercase,
            path=path,
        )

    def _encode_raw(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def _encode_raw_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.sp.encode(texts, out_type=int)]

    def _decode_raw(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer folder, loaded with ``local_files_only=True``.

    Special tokens the HF tokenizer would add on its own (Gemma adds BOS) are switched off:
    the recipe uses no BOS, and EOS is appended here so it is sticky on truncation.
    """

    def __init__(self, path: str, length: int = 64, lowercase: bool = True):
        from transformers import AutoTokenizer

        names = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "tokenizer_config.json")
        if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, n)) for n in names):
            raise ValueError(
                f"could not load a Hugging Face tokenizer from folder {path}: it holds no tokenizer file "
                f"({', '.join(names)}); a model saved with save_pretrained alone has none. Name the one "
                "the weights were trained with: tokenizer=hf tokenizer.path=<a folder with it> or "
                "tokenizer=sentencepiece tokenizer.path=<.model file>"
            )
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"could not load a Hugging Face tokenizer from folder {path}: {e}") from e
        eos = tok.eos_token_id
        if eos is None:
            eos = getattr(tok, "sep_token_id", None)
        if eos is None:
            raise ValueError(f"tokenizer in {path} has neither an EOS nor a SEP token")
        self.hf = tok
        super().__init__(
            vocab_size=len(tok),
            pad_id=_choose_pad(tok.pad_token_id, eos),
            eos_id=eos,
            length=length,
            lowercase=lowercase,
            path=path,
        )

    def _encode_raw(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def _encode_raw_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.hf(texts, add_special_tokens=False)["input_ids"]]

    def _decode_raw(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def build_tokenizer(path: str, length: int = 64, lowercase: bool = True) -> Tokenizer:
    """Load a tokenizer from a SentencePiece ``.model`` file or a local HF folder.

    Raises FileNotFoundError (missing path) or ValueError (unreadable) naming the path,
    so a typo in a config fails at start-up rather than at the first batch.
    """
    path = os.fspath(path)
    if path in ("", "???"):
        raise ValueError(
            "tokenizer.path is not set: give the tokenizer's file or folder, e.g. "
            "tokenizer.path=DIR/tokenizer.model (python -m siglip2.data.tokenizer train makes one)"
        )
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer not found: {path!r} (expected a SentencePiece .model file or a local "
            "Hugging Face tokenizer folder; nothing is downloaded)"
        )
    if os.path.isdir(path):
        return HFTokenizer(path, length=length, lowercase=lowercase)
    return SentencePieceTokenizer(path, length=length, lowercase=lowercase)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def tokenizer_fingerprint(path: str | os.PathLike) -> dict:
    """What a checkpoint records of the tokenizer it was trained with: the absolute `path` and
    the `sha256` of its content (the `.model` file, or a folder's tokenizer files by name).
    Two tokenizers of the same vocabulary size but other ids differ here."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    h = hashlib.sha256()
    if os.path.isdir(path):
        names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"no tokenizer files {_TOKENIZER_FILES} in {path}")
        for n in names:
            h.update(n.encode() + b"\0")
            with open(os.path.join(path, n), "rb") as f:
                h.update(f.read())
    else:
        with open(path, "rb") as f:
            h.update(f.read())
    return {"path": path, "sha256": h.hexdigest()}


@dataclass(frozen=True)
class TokenizerRecord:
    """The identity of a tokenizer, as a checkpoint or a teacher cache records it: the absolute
    `path`, the `sha256` of its content (`tokenizer_fingerprint`), and when known its
    `vocab_size`, text `length` and `lowercase`. Two tokenizers of one vocabulary size but other
    ids differ in `sha256`. The one owner of the rule "weights are used with the token ids they
    were trained with": `check` and `check_vocab_size` raise its one message."""

    path: str
    sha256: str
    vocab_size: int | None = None
    length: int | None = None
    lowercase: bool | None = None

    @classmethod
    def of(
        cls, path: str | os.PathLike, tokenizer: "Tokenizer | None" = None, *, full: bool = True
    ) -> "TokenizerRecord":
        """The record of the tokenizer file or folder `path`; with the built `tokenizer`, its
        vocabulary size and (`full`) its text length and lower-casing too."""
        fp = tokenizer_fingerprint(path)
        if tokenizer is None:
            return cls(**fp)
        if not full:
            return cls(**fp, vocab_size=int(tokenizer.vocab_size))
        return cls(
            **fp,
            vocab_size=int(tokenizer.vocab_size),
            length=int(tokenizer.length),
            lowercase=bool(getattr(tokenizer, "lowercase", True)),
        )

    @classmethod
    def read(cls, record: "Mapping[str, Any] | TokenizerRecord | None") -> "TokenizerRecord | None":
        """A record as stored (a dict with `path` and `sha256`), or None if there is none."""
        if record is None or isinstance(record, TokenizerRecord):
            return record
        if not record or not record.get("sha256"):
            return None
        known = {k: record.get(k) for k in ("path", "sha256", "vocab_size", "length", "lowercase")}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (checkpoints' `siglip2.tokenizer`): the fields that are known."""
        return {
            k: v
            for k, v in (
                ("path", self.path),
                ("sha256", self.sha256),
                ("vocab_size", self.vocab_size),
                ("length", self.length),
                ("lowercase", self.lowercase),
            )
            if v is not None
        }

    def describe(self) -> str:
        tokens = f", {self.vocab_size} tokens" if self.vocab_size is not None else ""
        return f"{self.path} (sha256 {str(self.sha256)[:12]}{tokens})"

    def check(
        self,
        trained: "Mapping[str, Any] | TokenizerRecord | None",
        source: str,
        hint: str = "use the same tokenizer (tokenizer.path=...)",
    ) -> None:
        """`trained`: the tokenizer `source`'s weights were trained with; this record: the one
        they are about to be used with. Another content (same vocabulary size or not) is a
        `ValueError` naming both; no record (older checkpoints) passes."""
        theirs = TokenizerRecord.read(trained)
        if theirs is None or theirs.sha256 == self.sha256:
            return
        raise ValueError(
            f"{source} was trained with the tokenizer {theirs.describe()}; this run's is "
            f"{self.describe()}: its token ids would mean other words. {hint[0].upper()}{hint[1:]}"
        )


def check_vocab_size(
    theirs: int,
    mine: int,
    source: str,
    mine_name: str,
    hint: str = "use the tokenizer those weights were trained with (tokenizer.path=...)",
) -> None:
    """Two sides that must share token ids with other vocabulary sizes: a `ValueError` naming
    both (`source` has `theirs`, `mine_name` has `mine`), before any tensor is compared."""
    if int(theirs) != int(mine):
        raise ValueError(f"{source} has a vocabulary of {int(theirs)} tokens but {mine_name} has {int(mine)}: {hint}")


def resolve_checkpoint_tokenizer(
    record: dict | None, configured: str | None, explicit: bool = False, what: str = "checkpoint"
) -> str:
    """The tokenizer to use with a checkpoint that recorded `record` (`TokenizerRecord`).

    - The checkpoint's own tokenizer when its file is still there, unchanged.
    - Else `configured`, if its content is the recorded one (the file moved).
    - `explicit` (the user named `configured`) and its content differs: `ValueError` naming both.
    - No record (a checkpoint from before tokenizers were recorded): `configured`, with a warning.
    Raises `ValueError` when no tokenizer with the recorded content can be found.
    """
    trained = TokenizerRecord.read(record)
    if trained is None:
        if configured is None:
            raise ValueError(f"{what} does not record its tokenizer: name it (tokenizer.path=...)")
        log.warning(
            "%s does not record its tokenizer; using %s: make sure it is the one it was trained with", what, configured
        )
        return str(configured)
    mine = TokenizerRecord.of(configured) if configured and os.path.exists(os.path.expanduser(configured)) else None
    if explicit and mine is not None:
        mine.check(trained, what, hint="leave the tokenizer unset to use the checkpoint's")
    if trained.path and os.path.exists(trained.path) and TokenizerRecord.of(trained.path).sha256 == trained.sha256:
        return str(trained.path)
    if mine is not None and mine.sha256 == trained.sha256:
        return str(configured)
    raise ValueError(
        f"{what} was trained with the tokenizer {trained.path} (sha256 {trained.sha256[:12]}), which is "
        f"not there any more or has changed, and {configured} is another one: give that tokenizer's "
        "file with tokenizer.path=..."
    )


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int = 4000) -> str:
    """Train a small Gemma-style SentencePiece model from an in-memory iterator.

    Gemma-like on purpose (pad 0, eos 1, bos 2, unk 3, BPE, byte fallback, split digits,
    identity normalisation, no dummy prefix), so the demo exercises the same code path as
    the real Gemma tokenizer. Single-threaded with a fixed seed so the same texts always
    give the same model. ``vocab_size`` is a soft limit: a tiny corpus gets fewer pieces
    rather than an error. Returns the ``.model`` path.
    """
    import sentencepiece as spm

    model_prefix = os.fspath(model_prefix)
    d = os.path.dirname(model_prefix)
    if d:
        os.makedirs(d, exist_ok=True)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")

    spm.set_random_generator_seed(0)
    try:
        _train_spm(spm, texts, model_prefix, vocab_size)
    except RuntimeError as e:  # SentencePiece's own check: every character needs a piece
        import re

        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m is None:
            raise
        raise ValueError(
            f"a vocabulary of {m.group(1)} is too small for these captions: their characters alone "
            f"need {m.group(2)} pieces (plus the 4 special ones); ask for more, e.g. "
            f"--vocab {max(4 * int(m.group(2)), 1000)}"
        ) from None
    return model_prefix + ".model"


def _train_spm(spm, texts: list[str], model_prefix: str, vocab_size: int) -> None:
    with open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.Train(
            logstream=devnull,
            sentence_iterator=iter(texts),
            model_prefix=model_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            num_threads=1,
            shuffle_input_sentence=False,
            max_sentence_length=16384,
            minloglevel=2,
        )


# ---- a SentencePiece model for your own shards ---------------------------------------------


def shard_captions(pattern: str, lowercase: bool = True) -> tuple[list[str], dict[str, int]]:
    """Every caption (`txt`, UTF-8) of the shards `pattern` matches, read as the training
    loader reads them, lower-cased as the tokenizer will see them; and the skip counts by
    reason (`missing_caption`, `bad_caption`, `empty_caption`, plus the tar faults of
    `siglip2.data.shards.read_shards`). Raises FileNotFoundError for a pattern with no shard."""
    from siglip2.data.decode import BadSample, decode_caption
    from siglip2.data.shards import _WorkerStats, expand_urls, read_shards

    stats = _WorkerStats()
    captions = []
    for raw in read_shards([{"url": u} for u in expand_urls(pattern)], stats):
        try:
            text = decode_caption(raw)  # as the training loader reads captions
        except BadSample as e:
            stats.skip(e.reason, raw.get("__key__", ""), raw.get("__url__", ""))
            continue
        captions.append(text.lower() if lowercase else text)
    return captions, dict(stats.counts)


def train_shard_tokenizer(
    pattern: str, vocab_size: int, out_dir: str, lowercase: bool = True, max_captions: int = 2_000_000, seed: int = 0
) -> dict[str, Any]:
    """Train `out_dir/tokenizer.model` on the captions of `pattern` with the demo tokenizer's
    SentencePiece settings (`train_sentencepiece`: BPE, byte fallback, digits split,
    character coverage 0.9995 for multilingual text, Gemma's special ids pad 0 / eos 1).

    At most `max_captions` captions are used (a seeded uniform sample; SentencePiece holds
    them in memory). `vocab_size` is a soft limit: a small corpus gets fewer pieces (the
    returned `vocab_size` says how many). Returns a summary: path, sha256, vocab size,
    captions read and used, skip counts."""
    import random as _random

    captions, skipped = shard_captions(pattern, lowercase=lowercase)
    if not captions:
        raise ValueError(f"no captions in {pattern} (skipped: {skipped or 'none'})")
    used = captions
    if len(captions) > max_captions:
        used = _random.Random(seed).sample(captions, max_captions)
    os.makedirs(out_dir, exist_ok=True)
    path = train_sentencepiece(used, os.path.join(out_dir, "tokenizer"), vocab_size=int(vocab_size))
    vocab = os.path.join(out_dir, "tokenizer.vocab")
    if os.path.exists(vocab):
        os.remove(vocab)
    tok = build_tokenizer(path, lowercase=lowercase)
    return {
        "path": path,
        "sha256": TokenizerRecord.of(path).sha256,
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": int(vocab_size),
        "captions": len(captions),
        "captions_used": len(used),
        "skipped": skipped,
        "lowercase": lowercase,
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m siglip2.data.tokenizer", description="Tokenizer tools for your own shards."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a SentencePiece model on the shards' captions")
    tr.add_argument("--shards", required=True, help="shard pattern, e.g. '/data/{00000..00999}.tar'")
    tr.add_argument("--vocab", type=int, default=32000, help="vocabulary size (a soft limit; default 32000)")
    tr.add_argument("--out", required=True, help="output folder: DIR/tokenizer.model")
    tr.add_argument("--max-captions", type=int, default=2_000_000, help="sample at most this many captions")
    tr.add_argument("--no-lowercase", action="store_true", help="keep case (then train with tokenizer.lowercase=false)")
    args, extra = ap.parse_known_args(argv)
    if extra:
        shell_expanded = all(e.endswith(".tar") or "/" in e for e in extra)
        ap.error(
            f"unrecognized arguments: {' '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"
            + (
                "; the shell expanded an unquoted {a..b} shard pattern into files: quote it, "
                "--shards '/data/{00000..00999}.tar'"
                if shell_expanded
                else ""
            )
        )
    summary = train_shard_tokenizer(
        args.shards, args.vocab, args.out, lowercase=not args.no_lowercase, max_captions=args.max_captions
    )
    print(json.dumps(summary, indent=2))
    print(
        f"train with: tokenizer=sentencepiece tokenizer.path={summary['path']}"
        + (" tokenizer.lowercase=false" if args.no_lowercase else "")
    )


if __name__ == "__main__":
    from siglip2.cli import user_errors

    with user_errors("python -m siglip2.data.tokenizer"):
        main()
