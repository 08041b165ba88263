"""Nothing lost, no silent wrong numbers (issue 18), in process: tokenizers recorded in the
checkpoint and checked against the model and the run, and checkpoints missing tower tensors
refused (the runs: tests/e2e/test_reliability.py).

Each test is a case a new user hit: it failed on the code before the fix and passes after.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.e2e


def test_checkpoints_carry_their_tokenizer_and_other_ids_are_refused(cache_dir, debug_pretrain, tmp_path):
    """A `debug=fast` model evaluated with the full demo's tokenizer (same vocabulary size,
    other ids) used to get wrong numbers silently. The checkpoint now records its tokenizer
    (path, sha256); eval and export use it, a run starting from it with another tokenizer
    stops naming both, and naming another one explicitly is refused."""
    import shutil

    from siglip2.checkpoint import read_checkpoint
    from siglip2.data.tokenizer import resolve_checkpoint_tokenizer, tokenizer_fingerprint
    from stages.runner import build
    from helpers import compose_cfg

    ckpt = read_checkpoint(str(debug_pretrain / "checkpoints" / "last.ckpt"))
    record = ckpt.meta.tokenizer
    own = str(cache_dir / "demo-n400-s0" / "tokenizer" / "demo_sp.model")
    assert record["path"] == own and record["sha256"] == tokenizer_fingerprint(own)["sha256"]
    assert record["vocab_size"] == ckpt.model_config.text.vocab_size
    # a tokenizer of the same vocabulary size with other ids: the demo's own with two pieces
    # swapped (another demo seed's tokenizer differs in size too since format 4: 2100 vs 2104)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(own, "rb").read())
    a, b = proto.pieces[100], proto.pieces[101]
    a.piece, b.piece = b.piece, a.piece
    other = str(tmp_path / "swapped_ids.model")
    with open(other, "wb") as f:
        f.write(proto.SerializeToString())
    cfg = compose_cfg(
        [f"tokenizer.path={other}", f"init_from={debug_pretrain}/checkpoints/last.ckpt"], cache_dir, tmp_path
    )
    with pytest.raises(ValueError, match="was trained with the tokenizer .*demo-n400-s0.*this run's is .*swapped_ids"):
        build(cfg)
    from siglip2.data.tokenizer import build_tokenizer

    assert build_tokenizer(other).vocab_size == record["vocab_size"]  # the size alone could not tell them apart
    # eval / export: the configured default is ignored for the checkpoint's own ...
    assert resolve_checkpoint_tokenizer(record, other) == own
    # ... an explicitly named other one is refused by name ...
    with pytest.raises(ValueError, match="swapped_ids"):
        resolve_checkpoint_tokenizer(record, other, explicit=True)
    # ... and a moved copy of the right one is found by its content
    moved = tmp_path / "moved.model"
    shutil.copy(own, moved)
    gone = {**record, "path": str(tmp_path / "nowhere.model")}
    assert resolve_checkpoint_tokenizer(gone, str(moved)) == str(moved)
    with pytest.raises(ValueError, match="not there any more"):
        resolve_checkpoint_tokenizer(gone, other)


def test_a_tokenizer_of_another_size_than_the_model_stops_before_compute(cache_dir, debug_pretrain, tmp_path):
    """`model=b16` (256,000 tokens) with the demo's ~2,100-token tokenizer used to build and
    train until an id or a shape failed deep inside; now the run stops at start, naming both."""
    from stages.runner import build
    from helpers import compose_cfg

    from siglip2.data.tokenizer import build_tokenizer

    cfg = compose_cfg(["model.text.vocab_size=256000"], cache_dir, tmp_path)
    size = build_tokenizer(str(cfg.tokenizer.path)).vocab_size  # the demo's, ~2,100 since format 4
    with pytest.raises(
        ValueError, match=f"model.text.vocab_size has a vocabulary of 256000 tokens but the tokenizer .* has {size}:"
    ):
        build(cfg)


def test_init_from_a_checkpoint_missing_tower_tensors_is_refused(cache_dir, debug_pretrain, tmp_path):
    """Tensors a checkpoint lacks may start fresh only in modules a stage adds (loss heads,
    the LocCa decoder, the EMA teacher), never in the towers: such a checkpoint used to load
    with the missing tensors left random and one INFO line."""
    from stages.runner import build
    from helpers import compose_cfg

    raw = torch.load(debug_pretrain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del raw["state_dict"]["model.text_model.final_layer_norm.weight"]
    torch.save(raw, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match="lacks 1 tensors of the model itself .*final_layer_norm.weight"):
        build(compose_cfg([f"init_from={tmp_path / 'cut.ckpt'}"], cache_dir, tmp_path))
    # a checkpoint without the LocCa decoder (a stage that had none) still starts one fresh
    for key in [k for k in raw["state_dict"] if k.startswith("losses.locca.")]:
        del raw["state_dict"][key]
    raw["state_dict"]["model.text_model.final_layer_norm.weight"] = torch.ones(128)
    torch.save(raw, tmp_path / "no_locca.ckpt")
    build(compose_cfg([f"init_from={tmp_path / 'no_locca.ckpt'}"], cache_dir, tmp_path / "ok"))
