"""Conversion to and from transformers, in the two layouts Google released SigLIP 2 in.

- NaFlex models: `transformers.Siglip2Model` + `Siglip2ImageProcessor` (native aspect ratio,
  up to `max_num_patches`). Our state_dict already has its names and shapes: conversion is
  the right `Siglip2Config` and a strict `load_state_dict`.
- Fixed-resolution models (e.g. `google/siglip2-base-patch16-224`): `transformers.SiglipModel`
  + `SiglipImageProcessor` (a square resize, as they were trained). The weights differ only in
  the patch embedding (a Conv2d instead of a Linear over (row, column, channel) patches) and a
  position table of exactly the image's grid.

`save_hf(..., preprocessing=)` writes the one whose processor reproduces the training
transform of the stage that made the weights (`python -m siglip2.export` picks it from the
checkpoint's stage). What HF cannot represent is refused rather than silently dropped: a
MAP-pooled text tower (`pool='map'`).

The tokenizer is written so that transformers' own text path (`AutoProcessor`, `AutoTokenizer`,
`pipeline("zero-shot-image-classification")`) gives the ids training gave: `tokenizer.json` is
our SentencePiece model (or local HF tokenizer) with lower-casing as its first normaliser, EOS
appended by its post-processor (sticky on truncation), padded on the right with *our* pad id
to `text.max_len`, no attention mask (the text tower has none). `save_hf` loads what it wrote
back through `AutoTokenizer` and compares ids with ours on probe texts; what transformers
cannot reproduce is an error, not a silently different tokenizer (see `export_tokenizer`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch

from ..model import SigLIP2, SigLIP2Config, TextConfig, VisionConfig

log = logging.getLogger(__name__)

# The length transformers' zero-shot pipeline pads every text to (hard-coded for SigLIP models).
PIPELINE_TEXT_LENGTH = 64


def hf_config(cfg: SigLIP2Config, special_ids: dict | None = None):
    """Our config -> `transformers.Siglip2Config`. `special_ids`: the tokenizer's
    `pad_token_id` / `eos_token_id` / `bos_token_id` (else None: HF's defaults are CLIP's)."""
    from transformers import Siglip2Config, Siglip2TextConfig, Siglip2VisionConfig

    if cfg.text.pool != "last":
        raise ValueError(f"text pool {cfg.text.pool!r} has no transformers equivalent (HF pools the last token)")
    v, t = cfg.vision, cfg.text
    vision = Siglip2VisionConfig(
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth,
        num_attention_heads=v.heads,
        num_channels=v.channels,
        patch_size=v.patch_size,
        num_patches=v.posemb_grid**2,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    text = Siglip2TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=t.mlp_dim,
        num_hidden_layers=t.depth,
        num_attention_heads=t.heads,
        max_position_embeddings=t.max_len,
        projection_size=cfg.embed_dim,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        **{"pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **(special_ids or {})},
    )
    return Siglip2Config(text_config=text.to_dict(), vision_config=vision.to_dict())


def our_config(hf_cfg, image_size: int | None = None) -> SigLIP2Config:
    """`transformers.Siglip2Config` -> ours. HF does not record an image size: default grid * patch."""
    v, t = hf_cfg.vision_config, hf_cfg.text_config
    for c in (v, t):
        if c.hidden_act != "gelu_pytorch_tanh" or abs(c.layer_norm_eps - 1e-6) > 1e-12:
            raise ValueError(f"unsupported {type(c).__name__}: act {c.hidden_act}, eps {c.layer_norm_eps}")
    grid = math.isqrt(v.num_patches)
    if grid * grid != v.num_patches:
        raise ValueError(f"num_patches {v.num_patches} is not a square grid")
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    return SigLIP2Config(
        vision=VisionConfig(
            width=v.hidden_size,
            depth=v.num_hidden_layers,
            mlp_dim=v.intermediate_size,
            heads=v.num_attention_heads,
            patch_size=patch,
            posemb_grid=grid,
            image_size=image_size or grid * patch,
            channels=v.num_channels,
        ),
        text=TextConfig(
            width=t.hidden_size,
            depth=t.num_hidden_layers,
            mlp_dim=t.intermediate_size,
            heads=t.num_attention_heads,
            vocab_size=t.vocab_size,
            max_len=t.max_position_embeddings,
            pool="last",
        ),
        embed_dim=t.projection_size,
    )


def siglip_config(cfg: SigLIP2Config, special_ids: dict | None = None):
    """Our config -> `transformers.SiglipConfig` (fixed resolution: the table is the image's grid)."""
    from transformers import SiglipConfig

    nested = hf_config(cfg, special_ids).to_dict()
    v = nested["vision_config"]
    v.pop("num_patches", None)
    v["image_size"] = int(cfg.vision.image_size)
    return SiglipConfig(text_config=nested["text_config"], vision_config=v)


def to_hf_fixed(model: SigLIP2, special_ids: dict | None = None):
    """-> a `transformers.SiglipModel` at `model.config.vision.image_size` (square inputs),
    holding copies of `model`'s weights: the Linear patch embedding as a Conv2d, the position
    table resized to the image's grid (what our model does with such an input, HF's rule)."""
    from transformers import SiglipModel

    from ..model.posemb import resize_posemb

    v = model.config.vision
    grid = v.image_size // v.patch_size  # a size that is not a multiple: HF's conv drops the rest, as ours
    state = dict(model.state_dict())
    key = "vision_model.embeddings."
    w = state[key + "patch_embedding.weight"]  # (D, p*p*C), patches flattened (row, column, channel)
    state[key + "patch_embedding.weight"] = (
        w.reshape(w.shape[0], v.patch_size, v.patch_size, v.channels).permute(0, 3, 1, 2).contiguous()
    )
    if grid != v.posemb_grid:
        state[key + "position_embedding.weight"] = resize_posemb(
            state[key + "position_embedding.weight"], (grid, grid), "hf"
        ).reshape(grid * grid, -1)
    p = next(model.parameters())
    with torch.device(p.device):  # built where the weights are (meta: no allocation, no init pass)
        hf = SiglipModel(siglip_config(model.config, special_ids)).to(dtype=p.dtype)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"SiglipModel layout mismatch: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)


def to_hf(model: SigLIP2, special_ids: dict | None = None):
    """-> a `transformers.Siglip2Model` holding copies of `model`'s weights (same dtype/device)."""
    from transformers import Siglip2Model

    p = next(model.parameters())
    with torch.device(p.device):
        hf = Siglip2Model(hf_config(model.config, special_ids)).to(dtype=p.dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.train(model.training)


def from_hf(hf_model_or_dir, image_size: int | None = None) -> SigLIP2:
    """A `transformers.Siglip2Model` or `SiglipModel` (fixed resolution), or a folder
    `from_pretrained` can read holding one, -> `SigLIP2`."""
    if isinstance(hf_model_or_dir, (str, Path)):
        from transformers import AutoConfig, SiglipModel, Siglip2Model

        kind = AutoConfig.from_pretrained(str(hf_model_or_dir)).model_type
        if kind not in ("siglip", "siglip2"):
            raise ValueError(f"{hf_model_or_dir}: a {kind!r} model, not SigLIP or SigLIP 2")
        hf_model_or_dir = (SiglipModel if kind == "siglip" else Siglip2Model).from_pretrained(str(hf_model_or_dir))
    hf = hf_model_or_dir
    p = next(hf.parameters())
    if hf.config.model_type == "siglip":
        return _from_siglip(hf, p)
    with torch.device(p.device):  # built where the weights are (meta: no allocation, no init pass)
        model = SigLIP2(our_config(hf.config, image_size)).to(dtype=p.dtype)
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.train(hf.training)


def _from_siglip(hf, p) -> SigLIP2:
    """A fixed-resolution `SiglipModel` -> ours: Conv2d patch embedding as the Linear, the
    position table of its image grid, and its own image size, a multiple of the patch or not
    (So400m/14 at 384 px: a 27 x 27 grid, the last 6 px unseen, in both)."""
    v = hf.config.vision_config
    nested = hf.config.to_dict()
    patch = int(v.patch_size)
    grid = int(v.image_size) // patch
    vision = dict(nested["vision_config"], num_patches=grid * grid)
    from transformers import Siglip2Config

    cfg = our_config(Siglip2Config(text_config=nested["text_config"], vision_config=vision), int(v.image_size))
    state = {k: t for k, t in hf.state_dict().items() if not k.endswith("position_ids")}
    key = "vision_model.embeddings.patch_embedding.weight"
    w = state[key]  # (D, C, p, p)
    state[key] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    with torch.device(p.device):
        model = SigLIP2(cfg).to(dtype=p.dtype)
    model.load_state_dict(state, strict=True)
    return model.train(hf.training)


PREPROCESSING = ("naflex", "fixed")

# Texts the exported tokenizer must encode exactly as ours: case, punctuation, digits, runs of
# spaces, tabs and newlines, leading/trailing blanks, several scripts, byte fallback (emoji), the
# literal text of special pieces (ours reads them as text), the empty string, and one text
# longer than any text length (truncation keeps EOS last).
PROBE_TEXTS = (
    "This is a photo of a Red Circle.",
    "A RED circle, on the LEFT; 2024-12-06 at 10:45 (3.14%)!",
    "  two  spaces\tand a tab\nand a newline  ",
    "",
    " ",
    "x",
    "İstanbul ÄÖÜ ẞ straße Σίσυφος",
    "Ein großer Hund läuft über die Straße, très jolie",
    "一只红色的猫坐在桌子上",
    "赤い四角形とカタカナのテキスト",
    "Красный круг на белом фоне",
    "دائرة حمراء على خلفية بيضاء",
    "सफ़ेद पृष्ठभूमि पर लाल घेरा",
    "emoji 🐈‍⬛ 😀!",
    "<eos> <pad> <unk> <bos> </s> <s> <mask>",
    "1234567890 0.5 1e-3",
    " ".join(f"word{i} and Another Word" for i in range(60)),
)

# Files of a tokenizer that save_hf writes (and removes again when they do not reproduce ours).
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "tokenizer.model",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def _backend_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes like `tok` before lower-casing, EOS and padding, and
    the user-defined pieces (SentencePiece emits them whole) that must stay whole in it."""
    from transformers import TokenizersBackend

    from ..data.tokenizer import HFTokenizer, SentencePieceTokenizer

    if isinstance(tok, SentencePieceTokenizer):
        # transformers' own conversion of a SentencePiece model (normaliser spec, BPE merges by
        # piece score or Unigram, byte fallback, user-defined pieces), as `AutoTokenizer` does it
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(tok.path, Path(d) / "tokenizer.model")
            (Path(d) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
            backend = copy.deepcopy(TokenizersBackend.from_pretrained(d).backend_tokenizer)
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tok.sp.serialized_model_proto())
        user_defined = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
        return backend, user_defined
    if isinstance(tok, HFTokenizer):
        if not getattr(tok.hf, "is_fast", False):
            raise ValueError(f"tokenizer {tok.path}: only a fast (tokenizer.json) Hugging Face tokenizer exports")
        return copy.deepcopy(tok.hf.backend_tokenizer), []
    raise ValueError(f"cannot export a {type(tok).__name__}: a SentencePiece model or a local HF tokenizer is needed")


def _split_special_tokens(tok) -> bool:
    """Whether special tokens' text in a caption is read as text (SentencePiece: always; a HF
    tokenizer: as it was set when training read it)."""
    hf = getattr(tok, "hf", None)
    return True if hf is None else bool(getattr(hf, "split_special_tokens", False))


def _piece(backend, i: int | None) -> str | None:
    return None if i is None or i < 0 else backend.id_to_token(int(i))


def export_tokenizer(tok, out: str | Path, model_type: str, image_processor=None) -> Path:
    """Write `tok` (a `siglip2.data.tokenizer.Tokenizer`) into `out` as the tokenizer (and, with
    `image_processor`, the processor) transformers loads for a `model_type` model, then check it.

    What is written: `tokenizer.json` (the backend, lower-casing first when `tok.lowercase`, EOS
    appended), `tokenizer_config.json` (pad/eos/unk pieces of *our* ids, right padding and
    truncation to `tok.length`, `padding="max_length"` as the processor's default, input ids only,
    special pieces' text in a caption read as training read it), and a
    `SiglipProcessor` over the image processor (for NaFlex too: `Siglip2Processor` hard-codes
    patch 16 / 256 patches / 64 tokens over the exported values; `SiglipProcessor` passes the
    image processor's own).

    Checked: `AutoTokenizer.from_pretrained(out)` (for a `siglip2` model transformers always
    builds its `Siglip2Tokenizer`: Gemma's BPE pipeline, always lower-cased) must give our ids for
    `PROBE_TEXTS`, padded and truncated as the processor and the zero-shot pipeline call it, and no
    id outside our vocabulary. Otherwise the tokenizer files are removed again and ValueError
    says what differs (e.g. a cased model or a Unigram SentencePiece model in a NaFlex export)."""
    from tokenizers import normalizers, processors
    from transformers import AddedToken, SiglipProcessor, TokenizersBackend

    out = Path(out)
    backend, user_defined = _backend_tokenizer(tok)
    if tok.lowercase:  # str.lower() before everything else, as ours
        backend.normalizer = (
            normalizers.Sequence([normalizers.Lowercase(), backend.normalizer])
            if backend.normalizer is not None
            else normalizers.Lowercase()
        )
    eos, pad = _piece(backend, tok.eos_id), _piece(backend, tok.pad_id)
    if eos is None or pad is None or backend.token_to_id(eos) != tok.eos_id or backend.token_to_id(pad) != tok.pad_id:
        raise ValueError(f"tokenizer {tok.path}: eos {tok.eos_id} / pad {tok.pad_id} have no pieces of their own")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, tok.eos_id)]
    )
    backend.no_padding()
    backend.no_truncation()
    sp = getattr(tok, "sp", None)
    bos = _piece(backend, sp.bos_id()) if sp is not None else getattr(getattr(tok, "hf", None), "bos_token", None)
    unk = _piece(backend, sp.unk_id()) if sp is not None else getattr(getattr(tok, "hf", None), "unk_token", None)
    hf_tok = TokenizersBackend(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        bos_token=bos,
        mask_token=None,
        add_bos_token=False,
        add_eos_token=True,
        model_max_length=tok.length,
        max_length=tok.length,
        padding="max_length",
        truncation=True,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids"],
        split_special_tokens=_split_special_tokens(tok),
    )
    if user_defined:  # whole, as SentencePiece emits them (kept by transformers' Siglip2Tokenizer too)
        hf_tok.add_tokens([AddedToken(p, special=False, normalized=True) for p in user_defined])
    if image_processor is not None:
        SiglipProcessor(image_processor=image_processor, tokenizer=hf_tok).save_pretrained(out)
    else:
        hf_tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # Explicit None: Siglip2Tokenizer would otherwise add its default "<mask>"/"<bos>" as new ids
    cfg.update(
        mask_token=None,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        add_bos_token=False,
        add_eos_token=True,
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    if hasattr(tok, "sp"):  # the training file as well, for sentencepiece users (transformers reads tokenizer.json)
        shutil.copy(tok.path, out / "tokenizer.model")
    problem, literal = check_exported_tokenizer(tok, out, model_type)
    if literal:
        log.warning(
            "exported tokenizer: a text holding the literal text of a control piece (%s) is read as that "
            "piece by transformers, as text by training (e.g. %r); every other probe text matches",
            ", ".join(c for c in _control_strings(tok) if any(c in t for t in literal)),
            literal[0][:40],
        )
    if problem:
        for f in _HF_TOKENIZER_FILES:
            (out / f).unlink(missing_ok=True)
        raise ValueError(
            f"transformers' tokenizer for this {model_type} export does not reproduce the training "
            f"tokenizer {tok.path}: {problem}. The weights and image processor are written, the "
            "tokenizer is not: tokenize with siglip2.data.tokenizer.build_tokenizer (the training "
            "tokenizer) and pass its ids as input_ids"
        )
    return out


def _control_strings(tok) -> list[str]:
    """The text of the pieces training never makes from text (SentencePiece control/unknown
    pieces, a HF tokenizer's special tokens)."""
    if hasattr(tok, "sp"):
        sp = tok.sp
        return [sp.id_to_piece(i) for i in range(tok.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
    return [str(t) for t in getattr(tok.hf, "all_special_tokens", [])]


def check_exported_tokenizer(tok, out: str | Path, model_type: str = "") -> tuple[str | None, list[str]]:
    """Does `AutoTokenizer.from_pretrained(out)` encode `PROBE_TEXTS` as `tok` does, called the
    processor's way (its saved defaults) and the zero-shot pipeline's way (max_length 64)?
    Returns (what differs or None, the probe texts that differ only because they hold the literal
    text of a control piece, e.g. "</s>": transformers' Unigram reads that as the piece, ours
    as text)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(out))
    finally:
        hf_logging.set_verbosity(level)
    extra = [t for t, i in hf_tok.get_added_vocab().items() if i >= tok.vocab_size]
    if extra:
        return f"it adds {extra} with ids past the vocabulary ({tok.vocab_size})", []
    texts = list(PROBE_TEXTS)
    ours = tok(texts)
    kw = {k: hf_tok.init_kwargs[k] for k in ("padding", "truncation", "max_length") if k in hf_tok.init_kwargs}
    theirs = hf_tok(texts, return_tensors="pt", **kw)
    if set(theirs) != {"input_ids"}:
        return f"it returns {sorted(theirs)}, not input_ids only", []
    calls = [("processor", theirs["input_ids"])]
    if tok.length == PIPELINE_TEXT_LENGTH:
        pipe = hf_tok(
            texts, return_tensors="pt", padding="max_length", max_length=PIPELINE_TEXT_LENGTH, truncation=True
        )
        calls.append(("pipeline", pipe["input_ids"]))
    control, literal = _control_strings(tok), []
    for how, got in calls:
        if got.shape != ours.shape:
            return f"{how} call: shape {tuple(got.shape)}, training {tuple(ours.shape)}", []
        for text, a, b in zip(texts, got, ours):
            if torch.equal(a, b):
                continue
            if any(c in text for c in control):
                literal += [text] if text not in literal else []
                continue
            hint = ""
            if model_type == "siglip2":
                hint = (
                    " (transformers builds its Siglip2Tokenizer for every siglip2 folder: Gemma's BPE pipeline, "
                    "always lower-cased" + ("; training was cased)" if not tok.lowercase else ")")
                )
            at = int((a != b).nonzero()[0])
            return (
                f"{how} call on {text[:40]!r}: ids {a.tolist()[max(0, at - 2) : at + 4]} from position "
                f"{max(0, at - 2)}, training's {b.tolist()[max(0, at - 2) : at + 4]}{hint}"
            ), []
    return None, literal


def save_hf(
    model: SigLIP2,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    preprocessing: str = "naflex",
    lowercase: bool = True,
) -> Path:
    """Write a folder transformers loads (safetensors + config + processor + tokenizer):

    - `preprocessing="naflex"`: `Siglip2Model` + `Siglip2ImageProcessor` (aspect kept, at most
      posemb_grid^2 patches): the NaFlex stage's transform.
    - `preprocessing="fixed"`: `SiglipModel` + `SiglipImageProcessor` (square resize to
      image_size, bilinear): the fixed-resolution stages' transform, the layout of Google's
      fixed-resolution SigLIP 2 releases.

    Both normalise with mean = std = 0.5 (our [-1, 1] inputs). `tokenizer_dir`: the training
    tokenizer (a SentencePiece `.model` file or a local HF tokenizer folder) and `lowercase` its
    setting: written by `export_tokenizer` so that `AutoProcessor` and the zero-shot `pipeline`
    give training's ids (or refused, naming why). The config's pad/eos/bos ids are its ids.
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    from transformers import Siglip2ImageProcessor, SiglipImageProcessor
    from transformers.image_utils import PILImageResampling

    tok, special_ids = None, None
    if tokenizer_dir is not None:
        from ..data.tokenizer import build_tokenizer

        if not Path(tokenizer_dir).exists():
            raise FileNotFoundError(f"tokenizer {tokenizer_dir} does not exist")
        tok = build_tokenizer(str(tokenizer_dir), length=model.config.text.max_len, lowercase=lowercase)
        if tok.vocab_size > model.config.text.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_dir} has {tok.vocab_size} ids, the model's text tower "
                f"{model.config.text.vocab_size}: not the tokenizer it was trained with"
            )
        bos = tok.sp.bos_id() if hasattr(tok, "sp") else getattr(tok.hf, "bos_token_id", None)
        special_ids = {
            "pad_token_id": tok.pad_id,
            "eos_token_id": tok.eos_id,
            "bos_token_id": bos if bos is not None and bos >= 0 else None,
        }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model, special_ids) if preprocessing == "naflex" else to_hf_fixed(model, special_ids)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # save_pretrained diffs against a default (CLIP-id) config and warns about it
    try:
        hf.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.set_verbosity(level)
    v = model.config.vision
    if preprocessing == "naflex":
        image_processor = Siglip2ImageProcessor(patch_size=v.patch_size, max_num_patches=v.posemb_grid**2)
    else:
        image_processor = SiglipImageProcessor(
            size={"height": v.image_size, "width": v.image_size},
            resample=PILImageResampling.BILINEAR,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    image_processor.save_pretrained(out)
    if tok is not None:
        model_type = "siglip2" if preprocessing == "naflex" else "siglip"
        export_tokenizer(tok, out, model_type, image_processor)
        if tok.length != PIPELINE_TEXT_LENGTH:
            log.warning(
                "text length %d: AutoProcessor + AutoModel reproduce training, but transformers' zero-shot "
                "pipeline pads every text to %d tokens: %s",
                tok.length,
                PIPELINE_TEXT_LENGTH,
                "it fails on this export (too few position embeddings)"
                if tok.length < PIPELINE_TEXT_LENGTH
                else "its numbers are not training's on this export (the text tower pools the last "
                "position): do not use the pipeline with it",
            )
    return out
