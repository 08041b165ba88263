"""`experiment=finetune` as a user runs it (issue 29): a transformers folder in a released
layout (a tiny random `SiglipModel` / `Siglip2Model` standing in for google/siglip2-*),
fine-tuned on the demo with docs/finetune.md's command, exported back to the folder's own layout, which
transformers loads with `from_pretrained` and `AutoProcessor`; every tensor keeps its name,
shape and dtype."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import cli

pytestmark = pytest.mark.e2e


def _released_folder(kind: str, vocab: int, out: Path) -> Path:
    """A tiny random folder with the demo model's shapes (conf/model/tiny.yaml) and vocabulary."""
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    vision = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4, patch_size=8)
    text = dict(
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=4,
        vocab_size=vocab,
        max_position_embeddings=40,
        projection_size=128,
    )
    torch.manual_seed(0)
    if kind == "fixed":
        model = SiglipModel(SiglipConfig(vision_config=dict(vision, image_size=64), text_config=text))
    else:
        model = Siglip2Model(Siglip2Config(vision_config=dict(vision, num_patches=64), text_config=text))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["fixed", "naflex"])
def test_finetune_a_released_folder_and_export_its_layout_back(kind, cache_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoProcessor

    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.export.__main__ import main as export

    demo = ensure_demo(str(cache_dir / "demo-n400-s0"), num_train=400, seed=0)
    vocab = build_tokenizer(str(demo.tokenizer_path), length=40).vocab_size
    folder = _released_folder(kind, vocab, tmp_path / "released")
    proc = cli(
        ["debug=fast", "experiment=finetune", f"init_from=hf:{folder}", "trainer.max_steps=3"],
        cache_dir,
        tmp_path / "logs",
    )
    out = proc.stdout + proc.stderr
    assert "starting fresh (never released): nothing" in out, out[-3000:]  # the sigmoid loss alone
    ckpt = next((tmp_path / "logs").glob("debug/runs/*/checkpoints/last.ckpt"))
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = raw["siglip2"]
    assert meta["init_from"]["path"] == f"hf:{folder.resolve()}" and raw["global_step"] == 3
    assert meta["init_from"]["model_type"] == ("siglip" if kind == "fixed" else "siglip2")  # the layout, recorded
    (folder / "config.json").unlink()  # the download moved: the export still writes its layout
    assert set(meta["losses"]) == {"sigmoid"}
    exported = export([f"ckpt_path={ckpt}", f"out={tmp_path / 'export'}"])
    hf = AutoModel.from_pretrained(exported)
    assert type(hf).__name__ == ("SiglipModel" if kind == "fixed" else "Siglip2Model")  # the folder's layout
    AutoProcessor.from_pretrained(exported)  # tokenizer and image processor written with it
    before, after = load_file(folder / "model.safetensors"), load_file(exported / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in before.items()} == {k: (v.shape, v.dtype) for k, v in after.items()}
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "vision_model.embeddings.patch_embedding.weight" in moved and "logit_scale" in moved  # it trained


@torch.no_grad()
@pytest.mark.parametrize("kind", ["fixed", "naflex"])
def test_real_photos_through_eval_py_and_transformers_give_the_same_zero_shot_probabilities(kind, cache_dir, tmp_path):
    """scikit-image's bundled photos (`python -m siglip2.data.photos`) as a zero-shot set: a
    released-layout folder (tiny, random; `SiglipModel` or NaFlex `Siglip2Model`) fine-tuned and
    exported, then `eval.py ckpt_path=hf:<export>` scores all 8, and our import with eval's own
    sample transform and image encoding (NaFlex: each photo at its aspect ratio, at most the
    processor's `max_num_patches`) gives the zero-shot probabilities of transformers' own
    `AutoProcessor` + `AutoModel` on the photos."""
    import json
    import subprocess
    import sys

    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from siglip2.data.demo import ensure_demo
    from siglip2.data.photos import PHOTOS, write_photo_set
    from siglip2.data.shards import build_eval_loader
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.eval.suite import EvalSample, _encode, load_eval_set
    from siglip2.export.__main__ import main as export
    from siglip2.export.hf import from_hf
    from helpers import ROOT

    demo = ensure_demo(str(cache_dir / "demo-n400-s0"), num_train=400, seed=0)
    vocab = build_tokenizer(str(demo.tokenizer_path), length=40).vocab_size
    folder = _released_folder(kind, vocab, tmp_path / "released")
    cli(
        ["debug=fast", "experiment=finetune", f"init_from=hf:{folder}", "trainer.max_steps=2"],
        cache_dir,
        tmp_path / "logs",
    )
    ckpt = next((tmp_path / "logs").glob("debug/runs/*/checkpoints/last.ckpt"))
    exported = export([f"ckpt_path={ckpt}", f"out={tmp_path / 'export'}"])
    photos = write_photo_set(tmp_path / "photos")
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path=hf:{exported}",
            f"eval.sets=[{photos}]",
            f"paths.log_dir={tmp_path / 'eval'}",
            f"paths.cache_dir={cache_dir}",
        ],
        cwd=ROOT,
        env=dict(os.environ, WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "eval").glob("eval/runs/*/metrics.json")).read_text())
    assert metrics["zeroshot/photos/num_images"] == len(PHOTOS) and 0 <= metrics["zeroshot/photos/top1"] <= 1

    es = load_eval_set(photos)
    prompts = [es.templates[0].format(c=c) for c in es.classnames]
    ours = from_hf(exported).eval()
    tok = build_tokenizer(str(exported), length=ours.config.text.max_len)
    hf, processor = AutoModel.from_pretrained(exported).eval(), AutoProcessor.from_pretrained(exported)
    v = ours.config.vision
    seq_len = processor.image_processor.max_num_patches if kind == "naflex" else None
    sample = EvalSample(es, v.image_size, naflex_seq_len=seq_len, patch_size=v.patch_size)
    batch = next(iter(build_eval_loader(es.urls, sample, batch_size=8)))
    if kind == "naflex":  # the photos are not square: each keeps its own grid, padded to the budget
        assert seq_len == 64 and len({tuple(s) for s in batch["spatial_shapes"].tolist()}) > 1
    image_emb = _encode(ours, batch, "cpu").embeds
    text_emb = ours.embed_text(tok(prompts))
    mine = torch.sigmoid(image_emb @ text_emb.t() * ours.logit_scale.exp() + ours.logit_bias)
    pics = [Image.open(io) for io in _photo_files(es)]
    inputs = processor(text=prompts, images=pics, padding="max_length", max_length=40, return_tensors="pt")
    theirs = torch.sigmoid(hf(**inputs).logits_per_image)
    assert float(mine.std()) > 1e-3  # the images score differently: a difference would show
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def _photo_files(es):
    """The set's JPEG bytes in shard order, as file objects."""
    import io
    import tarfile

    with tarfile.open(str(es.urls[0]) if isinstance(es.urls, list) else es.urls) as tar:
        return [io.BytesIO(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".jpg")]


@pytest.mark.parametrize("tower", ["frozen", "ema"])
def test_finetune_anchored_keeps_the_released_tower_as_its_teacher(tower, cache_dir, tmp_path):
    """`experiment=finetune_anchored`: the local-to-global loss runs from step 0 and its
    teacher's image tower is the released folder's, tensor for tensor, after training
    (`stage.ema.tower=frozen`), while the student moved and the teacher's heads followed the
    student's (EMA momentum 0 here: equal after the last update); with the paper's EMA tower
    the same run leaves the teacher's tower equal to the student's, off the folder."""
    from siglip2.data.demo import ensure_demo
    from siglip2.data.tokenizer import build_tokenizer
    from siglip2.export.hf import from_hf

    demo = ensure_demo(str(cache_dir / "demo-n400-s0"), num_train=400, seed=0)
    vocab = build_tokenizer(str(demo.tokenizer_path), length=40).vocab_size
    folder = _released_folder("fixed", vocab, tmp_path / "released")
    proc = cli(
        [
            "debug=fast",
            "experiment=finetune_anchored",
            f"init_from=hf:{folder}",
            "trainer.max_steps=3",
            f"stage.ema.tower={tower}",
            "stage.ema.momentum=0.0",
        ],
        cache_dir,
        tmp_path / "logs",
    )
    ckpt = next((tmp_path / "logs").glob("debug/runs/*/checkpoints/last.ckpt"))
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(raw["siglip2"]["losses"]) == {"sigmoid", "local_to_global"}, proc.stdout[-2000:]
    state = raw["state_dict"]
    original = from_hf(folder).vision_model.state_dict()
    teacher = {k[len("teacher.vision.") :]: v for k, v in state.items() if k.startswith("teacher.vision.")}
    student = {k[len("model.vision_model.") :]: v for k, v in state.items() if k.startswith("model.vision_model.")}
    assert teacher.keys() == original.keys() == student.keys()
    assert any(not torch.equal(student[k], original[k]) for k in original)  # the student trained
    if tower == "frozen":
        assert all(torch.equal(teacher[k], original[k]) for k in original)
    else:
        assert all(torch.equal(teacher[k], student[k]) for k in original)
    heads = {k: v for k, v in state.items() if k.startswith("teacher.heads.local_to_global.")}
    assert heads and all(
        torch.equal(v, state[k.replace("teacher.heads.local_to_global.", "losses.local_to_global.head.")])
        for k, v in heads.items()
    )
