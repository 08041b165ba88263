"""Export to a transformers Siglip2 folder and back; loaded by transformers itself."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import Siglip2ImageProcessor, Siglip2Model

from siglip2.export import from_hf, save_hf, to_hf
from siglip2.model import build_model

SIZES = dict(name="t", embed_dim=32,
             vision=dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4, posemb_grid=4, image_size=16),
             text=dict(width=24, depth=2, mlp_dim=48, heads=3, vocab_size=50, max_len=10))


def _model(**text):
    torch.manual_seed(0)
    m = build_model({**SIZES, "text": {**SIZES["text"], **text}}).eval()
    with torch.no_grad():
        m.logit_bias.fill_(-3.0)
    return m


@torch.no_grad()
def test_save_hf_loads_in_transformers(tmp_path):
    m = _model()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = save_hf(m, tmp_path / "hf", tokenizer_dir=tok)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    hf = Siglip2Model.from_pretrained(out).eval()
    proc = Siglip2ImageProcessor.from_pretrained(out)
    assert proc.patch_size == 4 and proc.max_num_patches == 16

    image, text = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 10))
    pv = image.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)
    ref = hf(input_ids=text, pixel_values=pv, pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
             spatial_shapes=torch.tensor([[4, 4], [4, 4]]))
    torch.testing.assert_close(m.encode_image(image=image).pooled, ref.vision_model_output.pooler_output)
    torch.testing.assert_close(m.encode_text(text), ref.text_model_output.pooler_output)
    o = m(image, text)
    torch.testing.assert_close(o["image_emb"] @ o["text_emb"].t() * o["logit_scale"] + o["logit_bias"],
                               ref.logits_per_image)


def test_round_trip(tmp_path):
    m = _model()
    back = from_hf(to_hf(m))
    assert back.config == m.config
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    save_hf(m, tmp_path)
    again = from_hf(tmp_path, image_size=16)
    assert again.config == m.config
    assert all(torch.equal(sd[k], again.state_dict()[k]) for k in sd)


def test_map_text_pool_cannot_export():
    with pytest.raises(ValueError, match="pool"):
        to_hf(_model(pool="map"))
