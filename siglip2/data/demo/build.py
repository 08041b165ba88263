"""Building the demo into a folder once, atomically, and reusing it after: :func:`ensure_demo`.

Writes every split's shards (in a process pool, :mod:`.splits`), trains the demo tokenizer on
:mod:`.corpus`, writes the eval YAMLs and last ``DONE.json`` (the parameters and every file's
size), all in a temp sibling renamed into place under a file lock, so concurrent DDP ranks
build once and a killed build is never read. :class:`DemoData` says where everything is.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from .corpus import _tokenizer_corpus
from .splits import _brace, _shard_plan, _write_shard, _yaml_specs
from .glyphs import LETTERS

# Bump when anything that changes the bytes of the output changes (in any module of this
# package), so old caches rebuild.

log = logging.getLogger(__name__)

FORMAT_VERSION = 6  # 4: glyph world (issue 28); 5: + words on elongated images; 6: + fairness sets


@dataclass
class DemoData:
    root: str
    train_urls: str  # brace pattern, absolute
    zeroshot_yaml: str  # letters
    retrieval_yaml: str
    refexp_yaml: str
    segmentation_yaml: str
    words_yaml: str  # words on elongated images (zero-shot by word)
    words_square_yaml: str  # the same words laid out square
    bias_neutral_yaml: str  # representation bias: glyphs in no attribute colour
    bias_attributed_yaml: str  # association bias: glyphs in red or blue
    fewshot_yaml: str  # the few-shot linear probe on the zero-shot set's images
    tokenizer_path: str
    num_train: int = 0
    classnames: list[str] = field(default_factory=lambda: list(LETTERS))
    built: bool = False  # True when this call generated the data (False: reused the cache)


def _build(out: str, params: dict, workers: int) -> None:
    """Generate everything into ``out`` (a fresh temp dir); DONE.json is written last."""
    import yaml

    from siglip2.data.tokenizer import train_sentencepiece

    seed = params["seed"]
    counts = {"train": params["num_train"], **params["eval_sizes"]}
    tasks = []
    for split, n in counts.items():
        d = os.path.join(out, "train") if split == "train" else os.path.join(out, "eval", split)
        os.makedirs(d, exist_ok=True)
        for shard, (start, c) in enumerate(_shard_plan(n)):
            tasks.append(
                (
                    os.path.join(d, f"{shard:06d}.tar"),
                    split,
                    seed,
                    shard,
                    start,
                    c,
                    params["word_share"],
                    (params["bias_strength"], params["bias_share"]),
                )
            )
    tasks.sort(key=lambda t: -t[5])  # largest first: the pool finishes together
    if workers and workers > 1 and not mp.current_process().daemon:  # daemons may not have children
        # spawn, not fork: DDP ranks and DataLoaders hold threads that fork would copy mid-lock
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_write_shard, tasks, chunksize=1)
    else:
        results = [_write_shard(t) for t in tasks]
    texts = [t for split, shard, ts in sorted(results, key=lambda r: (r[0], r[1])) for t in ts]
    corpus = _tokenizer_corpus(texts, np.random.default_rng([seed, 99]))
    # 4000 is a ceiling, not a size: format 4's captions gave SentencePiece ~2,100 pieces, format
    # 5's corpus (plus the words) ~2,400 (2407 for seed 0), and the model sizes its embedding
    # from the tokenizer.
    tok = train_sentencepiece(corpus, os.path.join(out, "tokenizer", "demo_sp"), vocab_size=4000)
    if os.path.exists(tok[: -len(".model")] + ".vocab"):
        os.remove(tok[: -len(".model")] + ".vocab")  # a human-readable copy of the model; unused
    _strip_build_path(tok)
    for split, spec in _yaml_specs(counts).items():
        os.makedirs(os.path.join(out, "eval", split), exist_ok=True)  # fewshot: a yaml over zeroshot's shards
        with open(os.path.join(out, "eval", split, f"{split}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(spec, f, allow_unicode=True, sort_keys=False)
    files = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            p = os.path.join(dirpath, name)
            files[os.path.relpath(p, out)] = os.path.getsize(p)
    marker = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "counts": counts,
        "train_shards": len(_shard_plan(counts["train"])),
        "files": dict(sorted(files.items())),
    }
    with open(os.path.join(out, "DONE.json.partial"), "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out, "DONE.json.partial"), os.path.join(out, "DONE.json"))


def _strip_build_path(model_path: str) -> None:
    """SentencePiece records its output path (our temp dir) in the model: drop it, so the same
    seed gives the same bytes wherever and whenever it was built."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: the model still works, it is just not byte-stable
        return
    m = pb.ModelProto()
    with open(model_path, "rb") as f:
        m.ParseFromString(f.read())
    m.trainer_spec.model_prefix = os.path.basename(model_path)[: -len(".model")]
    with open(model_path, "wb") as f:
        f.write(m.SerializeToString())


def _read_marker(root: str, params: dict) -> dict | None:
    """The marker if ``root`` is a finished build of exactly these parameters, with every file
    present at its recorded size; otherwise None (and the root gets rebuilt)."""
    try:
        with open(os.path.join(root, "DONE.json")) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if marker.get("format_version") != FORMAT_VERSION or marker.get("params") != params:
        return None
    for rel, size in marker.get("files", {}).items():
        try:
            if os.path.getsize(os.path.join(root, rel)) != size:
                return None
        except OSError:
            return None
    return marker


_OURS = {"train", "eval", "tokenizer", "DONE.json", "DONE.json.partial"}


def _check_replaceable(root: str) -> None:
    """Refuse to delete a folder that is not (a piece of) a demo build: --out may be a typo."""
    if os.path.isdir(root):
        extra = set(os.listdir(root)) - _OURS
        if extra:
            raise FileExistsError(
                f"{root} exists and holds files the demo did not write ({sorted(extra)[:5]}); "
                "refusing to replace it. Pick an empty or new folder."
            )
    elif os.path.exists(root):
        raise FileExistsError(f"{root} exists and is not a folder")


def _data(root: str, marker: dict, built: bool) -> DemoData:
    ev = lambda s: os.path.join(root, "eval", s, f"{s}.yaml")  # noqa: E731
    return DemoData(
        root=root,
        train_urls=os.path.join(root, "train", _brace(marker["train_shards"])),
        zeroshot_yaml=ev("zeroshot"),
        retrieval_yaml=ev("retrieval"),
        refexp_yaml=ev("refexp"),
        segmentation_yaml=ev("segmentation"),
        words_yaml=ev("words"),
        words_square_yaml=ev("words_square"),
        bias_neutral_yaml=ev("bias_neutral"),
        bias_attributed_yaml=ev("bias_attributed"),
        fewshot_yaml=ev("fewshot"),
        tokenizer_path=os.path.join(root, "tokenizer", "demo_sp.model"),
        num_train=marker["counts"]["train"],
        built=built,
    )


def ensure_demo(
    root,
    num_train: int = 20000,
    seed: int = 0,
    workers: int = 2,
    *,
    num_zeroshot: int = 800,
    num_retrieval: int = 500,
    num_refexp: int = 500,
    num_segmentation: int = 500,
    num_words: int = 500,
    word_share: float = 0.0,
    bias_strength: float = 0.0,
    bias_share: float = 0.5,
    num_bias: int = 500,
) -> DemoData:
    """The demo data under ``root``, generated on first use and reused after.

    Crash- and race-safe because DDP ranks call this at once and a killed run must not leave a
    cache that looks finished: generation goes to a temp sibling that is renamed into place
    only after ``DONE.json`` is written, and all of it happens under an exclusive ``fcntl`` lock
    on ``<root>.lock`` (local file systems; on NFS let rank 0 build first). A root whose marker
    is missing, names other parameters, or lists a file that is gone is rebuilt, never read.
    ``word_share``: the share of train images that are a word (``generate_word_sample``); the
    eval sets do not depend on it. Raises ``ValueError`` outside [0, 1].
    ``bias_strength`` s in [0, 1) and ``bias_share`` r in (0, 1): a planted bias on the glyph
    colours red and blue (issue 30's miniature, `splits.bias_accept`): red is r of the
    attribute-coloured glyphs, and within each half of the alphabet one colour is (1+s)/(1-s)
    times the other; 0 and 0.5 (the defaults) draw train exactly as before. ``num_bias``: the
    size of each fairness eval set.
    """
    root = os.path.abspath(os.fspath(root))
    if not 0.0 <= float(word_share) <= 1.0:
        raise ValueError(f"word_share is a share of the train images, in [0, 1]; got {word_share}")
    if not (0.0 <= float(bias_strength) < 1.0 and 0.0 < float(bias_share) < 1.0):
        raise ValueError(
            f"bias_strength must lie in [0, 1) and bias_share in (0, 1); got {bias_strength}, {bias_share}"
        )
    params = {
        "num_train": int(num_train),
        "seed": int(seed),
        "word_share": float(word_share),
        "bias_strength": float(bias_strength),
        "bias_share": float(bias_share),
        "eval_sizes": {
            "zeroshot": int(num_zeroshot),
            "retrieval": int(num_retrieval),
            "refexp": int(num_refexp),
            "segmentation": int(num_segmentation),
            "words": int(num_words),
            "words_square": int(num_words),
            "bias_neutral": int(num_bias),
            "bias_attributed": int(num_bias),
        },
    }
    if min(params["eval_sizes"].values()) < 1 or num_train < 1:
        raise ValueError(f"every split needs at least one sample, got {params}")
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with open(root + ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            marker = _read_marker(root, params)
            if marker is not None:
                return _data(root, marker, built=False)
            _check_replaceable(root)
            for name in os.listdir(parent):  # leftovers of killed builds; we hold the lock
                if name.startswith(base + ".tmp-") or name.startswith(base + ".old-"):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            tmp = os.path.join(parent, f"{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            try:
                log.info(
                    "building the demo data into %s (first use: %d training samples and the eval sets, "
                    "about a minute per 20,000 on 2 cores; reused after)",
                    root,
                    params["num_train"],
                )
                started = time.monotonic()
                _build(tmp, params, workers)
                log.info("demo data built in %.0f s", time.monotonic() - started)
                if os.path.exists(root):
                    old = os.path.join(parent, f"{base}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                    os.rename(root, old)
                    os.rename(tmp, root)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, root)
            finally:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
            marker = _read_marker(root, params)
            assert marker is not None, "demo build finished but its marker does not validate"
            return _data(root, marker, built=True)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
