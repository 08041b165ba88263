"""Tokenizer: lower-casing, EOS-sticky truncation, padding, multilingual round trips,
the three sources (.model file, HF folder, our trained demo model) and clear errors."""

from __future__ import annotations

import json
import os
import random

import pytest
import sentencepiece as spm
import torch

from siglip2.data.tokenizer import build_tokenizer, train_sentencepiece

MULTI = {
    "latin": "Ein großer Hund läuft über die Straße, très jolie",
    "chinese": "一只红色的猫坐在桌子上",
    "japanese": "赤い四角形とカタカナのテキスト、ひらがなも",
    "russian": "Красный круг на белом фоне",
    "arabic": "دائرة حمراء على خلفية بيضاء",
    "hindi": "सफ़ेद पृष्ठभूमि पर लाल घेरा",
}


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    words = "a the red blue green small large circle square triangle photo of on left right".split()
    texts = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + f" {rng.randint(0, 99999)}" for _ in range(n)
    ]
    # some multilingual text, but not the exact test sentences
    texts += [t[: len(t) // 2] for t in MULTI.values()] * 5
    return texts


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(corpus(), str(tmp_path_factory.mktemp("sp") / "demo_sp"), vocab_size=4000)


def test_trained_model_is_gemma_style(sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.piece_to_id("<0x41>") != sp.unk_id()  # byte fallback pieces exist
    # digits are split one per piece even though the corpus is full of numbers
    assert [sp.id_to_piece(i) for i in sp.encode("2024")][-4:] == ["2", "0", "2", "4"]


def test_a_vocabulary_smaller_than_the_characters_is_one_clear_error(tmp_path):
    """SentencePiece's own check ("Vocabulary size is smaller than required_chars") used to
    reach the user as a raw RuntimeError traceback from the CLI."""
    with pytest.raises(
        ValueError,
        match=r"a vocabulary of 20 is too small for these captions: their characters "
        r"alone need \d+ pieces.*--vocab \d+",
    ):
        train_sentencepiece(corpus(200), str(tmp_path / "small"), vocab_size=20)


def test_training_is_deterministic(tmp_path):
    a = train_sentencepiece(corpus(200), str(tmp_path / "a"), vocab_size=500)
    b = train_sentencepiece(iter(corpus(200)), str(tmp_path / "b"), vocab_size=500)
    # the file embeds its own path (trainer_spec.model_prefix), so compare what it holds
    pieces = [
        [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        for sp in (spm.SentencePieceProcessor(model_file=p) for p in (a, b))
    ]
    assert pieces[0] == pieces[1]


def test_lowercase_pad_eos(sp_model):
    tok = build_tokenizer(sp_model)
    assert (tok.pad_id, tok.eos_id, tok.length) == (0, 1, 64)
    out = tok(["A RED Circle", "a red circle"])
    assert out.dtype == torch.int64 and out.shape == (2, 64)
    assert torch.equal(out[0], out[1])
    ids = tok.encode("a red circle")
    assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
    n = len(ids)
    assert out[0, :n].tolist() == ids and (out[0, n:] == tok.pad_id).all()
    cased = build_tokenizer(sp_model, lowercase=False)
    assert cased.encode("A RED Circle") != ids


def test_truncation_keeps_eos_last(sp_model):
    tok = build_tokenizer(sp_model, length=8)
    text = "a red circle on the left of a large blue square on the right of the photo"
    full = tok.encode(text)
    assert len(full) > 8
    out = tok(text)
    assert out.shape == (1, 8)
    assert out[0].tolist() == full[:7] + [tok.eos_id]
    assert tok(text, length=3)[0].tolist() == full[:2] + [tok.eos_id]
    assert tok.decode(out[0]) == tok.decode(full[:7])


@pytest.mark.parametrize("script", sorted(MULTI))
def test_multilingual_round_trip(sp_model, script):
    tok = build_tokenizer(sp_model)
    text = MULTI[script]
    ids = tok.encode(text)
    assert tok.decode(ids) == text.lower()
    assert tok.decode(tok(text, length=200)[0]) == text.lower()  # pads dropped


def test_decode_stops_at_eos_and_drops_pad(sp_model):
    tok = build_tokenizer(sp_model)
    a, b = tok.encode("red circle"), tok.encode("blue square")
    assert tok.decode(a + b) == "red circle"
    assert tok.decode([tok.pad_id] + a[:-1] + [tok.pad_id]) == "red circle"


def test_model_without_pad_piece(tmp_path):
    # sentencepiece defaults: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus(200)),
        model_prefix=str(tmp_path / "nopad"),
        vocab_size=120,
        minloglevel=2,
        num_threads=1,
    )
    tok = build_tokenizer(str(tmp_path / "nopad.model"))
    assert (tok.pad_id, tok.eos_id) == (0, 2)
    out = tok("red circle")[0]
    n = len(tok.encode("red circle"))
    assert out[n - 1] == 2 and (out[n:] == 0).all()
    assert tok.decode(out) == "red circle"


def test_hf_folder(sp_model, tmp_path):
    """A HF folder made offline (the way a downloaded siglip2 folder looks: Gemma
    tokenizer, saved with save_pretrained) loads and agrees with the .model file."""
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(tmp_path / "hf"))

    hf = build_tokenizer(str(tmp_path / "hf"), length=16)
    sp = build_tokenizer(sp_model, length=16)
    assert (hf.pad_id, hf.eos_id) == (0, 1)
    for text in list(MULTI.values()) + ["A Red Circle 2024"]:
        assert hf.encode(text) == sp.encode(text), text  # no BOS added by the HF side
        assert torch.equal(hf(text), sp(text))
        assert hf.decode(hf(text, length=200)[0]) == text.lower()


def test_missing_and_unreadable(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(str(missing))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ValueError, match="junk.model"):
        build_tokenizer(str(junk))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_folder"):
        build_tokenizer(str(empty))


def test_tokenizer_record_tells_another_tokenizers_ids_apart(sp_model, tmp_path):
    """`TokenizerRecord`: the identity rule's one message, naming both tokenizers; the same
    content elsewhere (a moved file) passes; no record (older checkpoints) passes."""
    import shutil

    from siglip2.data.tokenizer import TokenizerRecord, check_vocab_size

    tok = build_tokenizer(sp_model)
    mine = TokenizerRecord.of(sp_model, tok)
    assert mine.to_dict() == {
        "path": os.path.abspath(sp_model),
        "sha256": mine.sha256,
        "vocab_size": tok.vocab_size,
        "length": tok.length,
        "lowercase": True,
    }
    assert TokenizerRecord.read(mine.to_dict()) == mine and TokenizerRecord.read(None) is None
    moved = tmp_path / "moved.model"
    shutil.copy(sp_model, moved)
    mine.check(TokenizerRecord.of(moved).to_dict(), "init_from=x")  # same ids: passes
    mine.check(None, "init_from=x")
    other_path = train_sentencepiece(
        corpus()[::-1] + ["another corpus entirely"], str(tmp_path / "other"), vocab_size=4000
    )
    other = TokenizerRecord.of(other_path, build_tokenizer(other_path))
    assert other.sha256 != mine.sha256
    with pytest.raises(
        ValueError,
        match=r"init_from=x was trained with the tokenizer .*other\.model \(sha256 "
        r"[0-9a-f]{12}, \d+ tokens\); this run's is .*demo_sp\.model.*other words",
    ):
        mine.check(other.to_dict(), "init_from=x")
    check_vocab_size(7, 7, "a", "b")
    with pytest.raises(ValueError, match="^a has a vocabulary of 7 tokens but b has 8: use the tokenizer"):
        check_vocab_size(7, 8, "a", "b")
