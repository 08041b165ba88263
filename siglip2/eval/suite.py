"""Evaluation sets described by a yaml beside their shards, and one function that runs any of them.

A set's yaml names its task (`zeroshot`, `retrieval`, `refexp`, `segmentation`, `fewshot`,
`representation_bias`, `association_bias`), its shards (a pattern relative to the yaml's
folder, or absolute), and the keys that hold labels, captions, language, masks and
attributes. Segmentation sets are scored by a linear probe on frozen patch tokens
(:mod:`siglip2.eval.dense_probe`, SigLIP 2 Table 2); few-shot sets by big_vision's closed-form
least-squares probe on frozen image embeddings (:mod:`siglip2.eval.fewshot`); the two bias
tasks by zero-shot predictions (:mod:`siglip2.eval.bias`, SigLIP 2's fairness section;
docs/fairness_evals.md). The same code serves the training callback and `eval.py`, single
process or DDP (each rank reads its own shards; results are gathered or synced before they
are computed).
"""

from __future__ import annotations

import logging
import time
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from siglip2 import distributed as dist_utils
from siglip2.data.decode import MASK_KEY
from siglip2.data.shards import BadSample, DecodedSample, build_eval_loader, is_filter_reason
from siglip2.data.transforms import ImageTransform, to_unit_range
from siglip2.eval.captioning import caption_names_object, generate_captions, object_name
from siglip2.eval.bias import association_bias, prediction_counts, representation_bias
from siglip2.eval.dense_probe import DenseProbeConfig, labels_from_mask, resize_labels, run_dense_probe
from siglip2.eval.fewshot import DEFAULT_L2_REG, DEFAULT_SEEDS, DEFAULT_SHOTS, run_fewshot
from siglip2.eval.precision import eval_precision, tower_autocast
from siglip2.eval.refexp import predict_boxes, refexp_accuracy
from siglip2.eval.retrieval import retrieval_recall
from siglip2.eval.zeroshot import ZeroShotMetrics, build_classifier, zeroshot_logits

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "refexp", "segmentation", "fewshot", "representation_bias", "association_bias")


@dataclass
class EvalSet:
    name: str
    task: str
    urls: str
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])
    label_key: str = "label"
    captions_key: str = "captions"
    lang_key: str = "lang"
    regions_key: str = "regions"
    # segmentation: `mask_key` png per sample (value k = classnames[k-1], 0 = background);
    # background_id 0: background is a scored class; null: value 0 is unlabelled (ADE20k).
    mask_key: str = MASK_KEY
    background_id: int | None = 0
    num_classes: int | None = None  # optional check: len(classnames) (+1 with background)
    probe: dict = field(default_factory=dict)  # DenseProbeConfig overrides
    num_samples: int | None = None  # informational: how many samples the shards hold
    # fewshot (siglip2.eval.fewshot): shot counts per class, seeds 0..seeds-1, ridge l2 (big_vision's 2**10)
    shots: list[int] = field(default_factory=lambda: list(DEFAULT_SHOTS))
    seeds: int = DEFAULT_SEEDS
    l2_reg: float = DEFAULT_L2_REG
    # association_bias (siglip2.eval.bias): the json key of each image's attribute value, and the
    # values scored (an image whose value is not listed is skipped as `filtered_attribute`)
    attribute_key: str = "attribute"
    attributes: list[str] = field(default_factory=list)

    @property
    def segmentation_classnames(self) -> list[str]:
        """Names of the probe's classes, in class-index order."""
        return (["background"] if self.background_id is not None else []) + list(self.classnames)


def load_eval_set(path: str | os.PathLike) -> EvalSet:
    """Reads an eval yaml; relative shard patterns are resolved against the yaml's folder.

    Raises FileNotFoundError for a missing file and ValueError for a missing required key, an
    unknown task, or a key `EvalSet` does not take (a typo such as `lable_key` would otherwise
    fall back to the default key silently), naming the closest known key."""
    import difflib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval set yaml not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an eval set yaml is a mapping of keys, got {type(spec).__name__}")
    known = sorted(EvalSet.__dataclass_fields__)
    unknown = [k for k in spec if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ValueError(f"{path}: unknown key {', '.join(hints)}; an eval set takes {known}")
    for key in ("name", "task", "urls"):
        if key not in spec:
            raise ValueError(f"{path}: missing required key '{key}'")
    if spec["task"] not in TASKS:
        raise ValueError(f"{path}: task must be one of {TASKS}, got {spec['task']!r}")
    urls = str(spec["urls"])
    if "://" not in urls and not urls.startswith("pipe:") and not os.path.isabs(urls):
        urls = str(path.parent / urls)
    if spec["task"] in ("zeroshot", "segmentation", "fewshot") and not spec.get("classnames"):
        raise ValueError(f"{path}: a {spec['task']} set needs classnames")
    if spec["task"] == "segmentation":
        _check_segmentation(path, spec)
    if spec["task"] == "fewshot":
        spec = _check_fewshot(path, spec)
    if spec["task"] in ("representation_bias", "association_bias"):
        spec = _check_bias(path, spec)
    return EvalSet(**spec | {"urls": urls})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fewshot(path: Path, spec: dict) -> dict:
    shots = spec.get("shots", list(DEFAULT_SHOTS))
    if (
        not isinstance(shots, list)
        or not shots
        or not all(_is_int(k) and k >= 1 for k in shots)
        or len(set(shots)) != len(shots)
    ):
        raise ValueError(f"{path}: shots must be a non-empty list of distinct integers >= 1, got {shots!r}")
    seeds = spec.get("seeds", DEFAULT_SEEDS)
    if not _is_int(seeds) or seeds < 1:
        raise ValueError(f"{path}: seeds (how many draws of the shots) must be an integer >= 1, got {seeds!r}")
    l2 = spec.get("l2_reg", DEFAULT_L2_REG)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0:
        raise ValueError(f"{path}: l2_reg must be a number > 0, got {l2!r}")
    return spec | {"l2_reg": float(l2)}


def _check_bias(path: Path, spec: dict) -> dict:
    task, names = spec["task"], spec.get("classnames") or []
    what = "attribute values" if task == "representation_bias" else "concepts"
    if not isinstance(names, list) or len(names) < 2:
        raise ValueError(f"{path}: a {task} set needs classnames: at least 2 {what}, got {names!r}")
    names = [str(c) for c in names]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: classnames repeat a name: {names}")
    if not spec.get("templates", ["{c}"]):
        raise ValueError(f"{path}: templates must name at least one prompt")
    out = spec | {"classnames": names}
    if task == "association_bias":
        attributes = spec.get("attributes") or []
        if not isinstance(attributes, list) or len(attributes) < 2:
            raise ValueError(
                f"{path}: an association_bias set needs attributes: at least 2 values of the json key "
                f"{spec.get('attribute_key', 'attribute')!r}, got {attributes!r}"
            )
        attributes = [str(a) for a in attributes]
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"{path}: attributes repeat a value: {attributes}")
        out["attributes"] = attributes
    return out


def _check_segmentation(path: Path, spec: dict) -> None:
    if spec.get("mask_key", MASK_KEY) != MASK_KEY:
        raise ValueError(
            f"{path}: mask_key must be {MASK_KEY!r} (the member the shard decoder reads), got {spec['mask_key']!r}"
        )
    background = spec.get("background_id", 0)
    if background not in (0, None):
        raise ValueError(
            f"{path}: background_id must be 0 (mask value 0 is a scored background class) "
            f"or null (value 0 is unlabelled), got {background!r}"
        )
    expected = len(spec["classnames"]) + (background is not None)
    if spec.get("num_classes") is not None and int(spec["num_classes"]) != expected:
        raise ValueError(
            f"{path}: num_classes={spec['num_classes']} but {len(spec['classnames'])} classnames"
            f"{' + background' if background is not None else ''} make {expected}"
        )
    DenseProbeConfig.from_dict(spec.get("probe"))  # unknown or invalid options fail at load time


class EvalSample:
    """DecodedSample -> what each task needs (image, label, captions, language, regions, masks)."""

    def __init__(
        self,
        es: EvalSet,
        image_size: int,
        naflex_seq_len: int | None = None,
        patch_size: int | None = None,
        aspect_min: float | None = None,
    ):
        """`naflex_seq_len`: instead of a square `image_size` view, each image keeps its aspect
        ratio at the largest size of at most that many `patch_size` patches (`siglip2.data.naflex`),
        padded to the length: `patches` uint8, `patch_coord`, `patch_valid`, `spatial_shapes`.
        `aspect_min`: keep only images at least this elongated (max(w/h, h/w) >= aspect_min);
        the others are left out and counted (reason `filtered_aspect`, an info line "kept N of
        M"), e.g. the demo's 1:2 and 2:1 images for NaFlex's direction. A sample without what
        its task needs is skipped under `missing_label`, `missing_captions`, `missing_regions`
        or `missing_mask` (a warning: the set's data is incomplete)."""
        self.es = es
        self.transform = ImageTransform(image_size)
        self.naflex_seq_len, self.patch_size = naflex_seq_len, patch_size
        self.aspect_min = float(aspect_min) if aspect_min else None
        if naflex_seq_len is not None and not patch_size:
            raise ValueError("NaFlex evaluation needs the model's patch size")

    def _naflex(self, img) -> dict[str, torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF

        from siglip2.data.naflex import pad_patches, patchify_image, resize_for_max_patches

        x = resize_for_max_patches(TF.pil_to_tensor(img), self.patch_size, self.naflex_seq_len)
        batch = pad_patches([patchify_image(x, self.patch_size)], self.naflex_seq_len)
        return {k: v[0] for k, v in batch.items()}

    def __call__(self, sample: DecodedSample) -> dict[str, Any] | None:
        if self.aspect_min is not None:
            w, h = sample.image.size
            if max(w / h, h / w) < self.aspect_min:
                raise BadSample("filtered_aspect", f"{w}x{h} is under aspect {self.aspect_min:g}")
        meta = sample.meta if isinstance(sample.meta, dict) else {}
        out: dict[str, Any] = {"key": sample.key, "lang": str(meta.get(self.es.lang_key, "en"))}
        if self.naflex_seq_len is not None and self.es.task != "segmentation":
            out.update(self._naflex(sample.image))
            image = None
        else:
            image, _ = self.transform(sample.image, None)
            out["image"] = image
        if self.es.task == "zeroshot":
            if self.es.label_key not in meta:
                raise BadSample("missing_label", f"no {self.es.label_key!r} in the json")
            out["label"] = torch.tensor(int(meta[self.es.label_key]))
            out["objects"] = list(meta.get("objects") or [])
        elif self.es.task == "fewshot":
            if self.es.label_key not in meta:
                raise BadSample("missing_label", f"no {self.es.label_key!r} in the json")
            label, index = meta[self.es.label_key], None
            if not isinstance(label, (bool, float)) or (isinstance(label, float) and label.is_integer()):
                try:  # an int, an integral float or a numeric string, as zero-shot reads it
                    index = int(label)
                except (TypeError, ValueError):
                    pass
            if index is None or not 0 <= index < len(self.es.classnames):
                raise BadSample(
                    "bad_label", f"{self.es.label_key}={label!r} is not a class index in [0, {len(self.es.classnames)})"
                )
            out["label"] = torch.tensor(index)
        elif self.es.task == "association_bias":
            if self.es.attribute_key not in meta:
                raise BadSample("missing_attribute", f"no {self.es.attribute_key!r} in the json")
            value = str(meta[self.es.attribute_key])
            if value not in self.es.attributes:
                raise BadSample(
                    "filtered_attribute", f"{self.es.attribute_key}={value!r} is not one of {self.es.attributes}"
                )
            out["attribute"] = torch.tensor(self.es.attributes.index(value))
        elif self.es.task == "retrieval":
            captions = meta.get(self.es.captions_key) or [sample.caption]
            out["captions"] = [c for c in captions if isinstance(c, str) and c.strip()]
            if not out["captions"]:
                raise BadSample("missing_captions", f"no {self.es.captions_key!r} in the json and no txt")
        elif self.es.task == "refexp":
            out["regions"] = list(meta.get(self.es.regions_key) or [])
            if not out["regions"]:
                raise BadSample("missing_regions", f"no {self.es.regions_key!r} in the json")
        elif self.es.task == "segmentation":
            if sample.mask is None:
                raise BadSample("missing_mask", "no seg.png member")
            labels = labels_from_mask(sample.mask, len(self.es.classnames), self.es.background_id is not None)
            out["seg"] = labels  # (H, W) class indices at the mask's own size: scoring targets
            out["seg_small"] = resize_labels(labels, image.shape[-2:])  # at the input size: training
        return out


class _CountedLoader:
    """An eval loader whose batches' skip counts are folded (`stats`); batches with no
    samples (the stream's trailing skip counts) are not passed on."""

    def __init__(self, loader):
        from siglip2.data.shards import SkipStats

        self.loader, self.stats = loader, SkipStats()

    def __iter__(self):
        for batch in self.loader:
            self.stats.update(batch)
            if "key" in batch:
                yield batch


def _batches(loader, max_batches: int | None):
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def _skip_metrics(stats, prefix: str, delivered: float | None = None) -> dict[str, float]:
    """`<prefix>/skipped_<reason>`: the set's samples skipped by reason, summed over ranks.
    Bad or incomplete samples are a warning; a deliberate filter (`filtered_*`, e.g. the aspect
    subset) an info line "kept N of M" when `delivered` (the images scored) is known."""
    totals: dict[str, int] = {}
    for part in dist_utils.all_gather_object(stats.totals()):
        for reason, n in part.items():
            totals[reason] = totals.get(reason, 0) + int(n)
    for reason, n in sorted(totals.items()):
        if not is_filter_reason(reason):
            log.warning("%s: %d samples skipped (%s)", prefix, n, reason)
        elif delivered is not None:
            log.info(
                "%s: kept %d of %d images (%d left out: %s)", prefix, int(delivered), int(delivered) + n, n, reason
            )
        else:
            log.info("%s: %d images left out (%s)", prefix, n, reason)
    return {f"{prefix}/skipped_{reason}": float(n) for reason, n in totals.items()}


@torch.no_grad()
def evaluate_set(
    es: EvalSet,
    model: torch.nn.Module,
    tokenizer: Callable,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
    max_batches: int | None = None,
    decoder: torch.nn.Module | None = None,
    keep_examples: int = 0,
    naflex_seq_len: int | None = None,
    aspect_min: float | None = None,
    refexp_probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of one set, keyed `<task>/<set name>/<metric>`, plus `_examples`/`_tables` extras.

    `naflex_seq_len`: zero-shot, retrieval and refexp see each image at its own aspect ratio
    with at most that many patches (a NaFlex model, `eval.naflex_seq_len=256`); the dense
    probe, which needs a fixed grid, keeps the square `image_size` view. `aspect_min`: only
    images at least that elongated (see `EvalSample`). `refexp_probe`: `RefexpProbeConfig`
    keys (None = off): refexp sets also train a fresh decoder on the frozen tower and report
    `probe_acc@0.5` (:mod:`siglip2.eval.refexp_probe`, the paper's Table 5 protocol), which
    also scores a model without a LocCa decoder."""
    sample_fn = EvalSample(
        es,
        image_size,
        naflex_seq_len,
        getattr(getattr(model, "config", None), "vision", None) and model.config.vision.patch_size,
        aspect_min,
    )
    loader = _CountedLoader(
        build_eval_loader(
            es.urls, sample_fn, batch_size=batch_size, num_workers=num_workers, decode_mask=es.task == "segmentation"
        )
    )
    prefix = f"{es.task}/{es.name}"
    was_training = model.training
    model.eval()
    try:
        # CUDA: towers in bf16 autocast, other float32 matmuls in TF32; CPU: fp32 (eval.precision)
        with eval_precision(device):
            return _run_task(
                es, model, tokenizer, loader, device, max_batches, prefix, keep_examples, decoder, refexp_probe
            )
    finally:
        model.train(was_training)


def _run_task(
    es, model, tokenizer, loader, device, max_batches, prefix, keep_examples, decoder, refexp_probe=None
) -> dict[str, Any]:
    if es.task == "zeroshot":
        out = _zeroshot(es, model, tokenizer, loader, device, max_batches, prefix, keep_examples, decoder)
    elif es.task == "retrieval":
        out = _retrieval(model, tokenizer, loader, device, max_batches, prefix)
    elif es.task == "refexp":
        if decoder is None and refexp_probe is None:
            log.info(
                "skipping %s: this stage has no LocCa decoder (eval.refexp_probe trains one on the frozen tower)",
                prefix,
            )
            return {}
        out = _refexp(model, tokenizer, loader, device, max_batches, prefix, decoder, refexp_probe)
    elif es.task == "segmentation":
        out = _segmentation(es, model, loader, device, max_batches, prefix)
    elif es.task == "fewshot":
        out = _fewshot(es, model, loader, device, max_batches, prefix)
    elif es.task == "representation_bias":
        out = _representation_bias(es, model, tokenizer, loader, device, max_batches, prefix)
    elif es.task == "association_bias":
        out = _association_bias(es, model, tokenizer, loader, device, max_batches, prefix)
    else:
        raise ValueError(f"{prefix}: unknown task {es.task!r}; tasks are {TASKS}")
    delivered = next((v for k, v in out.items() if k.endswith("/num_images")), None)
    if delivered == 0:  # a rate over no image is not a 0%: report the count alone
        log.warning("%s: no image was scored (see the skip counts), so its rates are not reported", prefix)
        out = {k: v for k, v in out.items() if k.endswith("/num_images")}
    return {**out, **_skip_metrics(loader.stats, prefix, delivered)}


def _segmentation(es, model, loader, device, max_batches, prefix):
    """Linear probe on frozen patch tokens: train on the set's training keys, mIoU on the rest."""
    names = es.segmentation_classnames
    res = run_dense_probe(
        model, _batches(loader, max_batches), len(names), device, DenseProbeConfig.from_dict(es.probe)
    )
    if not res:
        return {}
    log.info(
        "%s: dense probe on %d + %d images took %.1f s",
        prefix,
        res["num_train_images"],
        res["num_test_images"],
        res["seconds"],
    )
    out: dict[str, Any] = {
        f"{prefix}/{k}": float(res[k]) for k in ("miou", "pixel_acc", "num_train_images", "num_test_images")
    }
    # per-class IoU; NaN = class neither labelled nor predicted in the held-out part
    out["_tables"] = {prefix: [[c, float(v)] for c, v in zip(names, res["iou"].tolist())]}
    return out


def _encode(model, batch: dict[str, Any], device):
    """`ImageOutput` of a batch of square images (`image`) or NaFlex patches (`patches`...),
    the tower under `tower_autocast(device)` (its `embeds` are float32 all the same)."""
    if "patches" in batch:
        patches = batch["patches"].to(device)
        patches = to_unit_range(patches) if patches.dtype == torch.uint8 else patches
        with tower_autocast(device):
            return model.encode_image(
                patches=patches,
                patch_coord=batch["patch_coord"].to(device),
                patch_valid=batch["patch_valid"].to(device),
                spatial_shapes=batch["spatial_shapes"].to(device),
            )
    with tower_autocast(device):
        return model.encode_image(image=batch["image"].to(device))


def _under(context, device, fn: Callable) -> Callable:
    """``fn`` called inside ``context(device)`` (the classifier builder calls the text tower)."""

    def call(*args, **kwargs):
        with context(device):
            return fn(*args, **kwargs)

    return call


def _batch_len(batch: dict[str, Any]) -> int:
    return int((batch["patches"] if "patches" in batch else batch["image"]).shape[0])


def _zeroshot(es, model, tokenizer, loader, device, max_batches, prefix, keep_examples, decoder):
    classifier = build_classifier(
        _under(tower_autocast, device, model.encode_text), tokenizer, es.classnames, es.templates, device=device
    )
    metrics = ZeroShotMetrics(len(es.classnames)).to(device)
    examples: list[dict[str, Any]] = []
    named, captioned = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in _batches(loader, max_batches):
        image = batch["image"].to(device) if "image" in batch else None
        out = _encode(model, batch, device)
        logits = zeroshot_logits(out.embeds, classifier)
        metrics.update(logits, batch["label"].to(device))
        captions = None
        if decoder is not None and any(batch["objects"]):
            # LocCa captions of single-object images: do they name the object's colour and category?
            with tower_autocast(device):
                captions = generate_captions(decoder, out.tokens, out.token_mask, tokenizer)
            for caption, objects in zip(captions, batch["objects"]):
                if objects:
                    captioned += 1
                    named += float(any(caption_names_object(caption, object_name(o), o["color"]) for o in objects))
        if len(examples) < keep_examples:
            top = logits.topk(min(3, logits.shape[1]), dim=-1).indices.cpu()
            for i in range(min(keep_examples - len(examples), _batch_len(batch))):
                example = {
                    "label": es.classnames[int(batch["label"][i])],
                    "top": [es.classnames[int(j)] for j in top[i]],
                }
                if image is not None:
                    example["image"] = image[i].cpu()
                if captions is not None:
                    example["caption"] = captions[i]
                examples.append(example)
    result = metrics.compute()
    out: dict[str, Any] = {
        f"{prefix}/top1": float(result["top1"]),
        f"{prefix}/top5": float(result["top5"]),
        f"{prefix}/num_images": float(result["num_images"]),
    }
    if decoder is not None:
        named, captioned = dist_utils.all_reduce_sum(named), dist_utils.all_reduce_sum(captioned)
        if captioned > 0:
            out[f"{prefix}/caption_names_object"] = float(named / captioned)
    out["_tables"] = {prefix: [[c, float(a)] for c, a in zip(es.classnames, result["per_class"].tolist())]}
    out["_examples"] = {prefix: examples}
    return out


def _retrieval(model, tokenizer, loader, device, max_batches, prefix):
    image_embs, text_embs, owners, langs = [], [], [], []
    n_images = 0
    for batch in _batches(loader, max_batches):
        image_embs.append(_encode(model, batch, device).embeds)
        flat = [c for caps in batch["captions"] for c in caps]
        owner = [n_images + i for i, caps in enumerate(batch["captions"]) for _ in caps]
        with tower_autocast(device):
            text_embs.append(model.embed_text(tokenizer(flat).to(device)))
        owners.append(torch.tensor(owner, dtype=torch.long))
        langs.extend(batch["lang"][i] for i, caps in enumerate(batch["captions"]) for _ in caps)
        n_images += _batch_len(batch)
    # a rank with no images of this set (more ranks than shards) still joins the gathers, as (0, D)
    image_emb = torch.cat(image_embs) if image_embs else torch.zeros(0, int(model.config.embed_dim), device=device)
    text_emb = torch.cat(text_embs) if text_embs else torch.zeros(0, image_emb.shape[1], device=device)
    owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
    # Under DDP each rank holds its own images: gather, shifting owners by earlier ranks' counts.
    counts = dist_utils.all_gather_object(n_images)
    offset = sum(counts[: dist_utils.get_rank()])
    image_emb = dist_utils.all_gather_variable(image_emb)
    text_emb = dist_utils.all_gather_variable(text_emb)
    owner = dist_utils.all_gather_variable((owner + offset).to(image_emb.device)).cpu()
    langs = [lang for part in dist_utils.all_gather_object(langs) for lang in part]
    out: dict[str, Any] = {}
    for key, value in retrieval_recall(image_emb, text_emb, owner).items():
        out[f"{prefix}/{key}"] = float(value)
    # Multilingual: the non-English captions against all images, reported on their own.
    other = torch.tensor([lang != "en" for lang in langs], dtype=torch.bool)
    if other.any():
        keep_images = torch.unique(owner[other])
        remap = torch.full((image_emb.shape[0],), -1, dtype=torch.long)
        remap[keep_images] = torch.arange(len(keep_images))
        sub = retrieval_recall(
            image_emb[keep_images.to(image_emb.device)], text_emb[other.to(text_emb.device)], remap[owner[other]]
        )
        for key, value in sub.items():
            out[f"{prefix}/non_en/{key}"] = float(value)
        out[f"{prefix}/non_en/num_captions"] = float(other.sum())
    out[f"{prefix}/num_images"] = float(image_emb.shape[0])
    return out


def _fewshot(es, model, loader, device, max_batches, prefix):
    """big_vision's few-shot linear probe (siglip2.eval.fewshot) on the gathered embeddings:
    every rank gathers every image's embedding, label and key, then solves the same probes."""
    embs, labels, keys = [], [], []
    for batch in _batches(loader, max_batches):
        embs.append(_encode(model, batch, device).embeds.float())
        labels.append(batch["label"].long())
        keys.extend(batch["key"])
    # a rank with no images of this set (more ranks than shards) still joins the gathers, as (0, D)
    emb = torch.cat(embs) if embs else torch.zeros(0, int(model.config.embed_dim), device=device)
    label = torch.cat(labels).to(emb.device) if labels else torch.zeros(0, dtype=torch.long, device=emb.device)
    emb, label = dist_utils.all_gather_variable(emb), dist_utils.all_gather_variable(label)
    keys = [k for part in dist_utils.all_gather_object(keys) for k in part]
    started = time.monotonic()
    res = run_fewshot(emb.cpu(), label.cpu(), keys, len(es.classnames), es.shots, es.seeds, es.l2_reg)
    log.info(
        "%s: few-shot probes (%d shot counts x %d seeds) took %.1f s",
        prefix,
        len(es.shots),
        es.seeds,
        time.monotonic() - started,
    )
    return {f"{prefix}/{k}": float(v) for k, v in res.items()}


def _zeroshot_predictions(es, model, tokenizer, loader, device, max_batches, extra: str | None = None):
    """Top-1 zero-shot class of every image this rank reads ((n,) int64 on `device`), as
    `_zeroshot` scores them (template-averaged classifier, cosine), and the batches' `extra`
    values ((n,) int64) when named."""
    classifier = build_classifier(
        _under(tower_autocast, device, model.encode_text), tokenizer, es.classnames, es.templates, device=device
    )
    preds, extras = [], []
    for batch in _batches(loader, max_batches):
        preds.append(zeroshot_logits(_encode(model, batch, device).embeds, classifier).argmax(dim=-1))
        if extra is not None:
            extras.append(batch[extra].long().to(device))
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
    if extra is None:
        return pred, None
    return pred, torch.cat(extras) if extras else torch.zeros(0, dtype=torch.long, device=device)


def _representation_bias(es, model, tokenizer, loader, device, max_batches, prefix):
    """First-order bias (siglip2.eval.bias): which attribute value's prompts each image prefers;
    the per-value counts are summed over ranks before the shares are computed."""
    pred, _ = _zeroshot_predictions(es, model, tokenizer, loader, device, max_batches)
    counts = dist_utils.all_reduce_sum(prediction_counts(pred, len(es.classnames))).cpu()
    total = float(counts.sum())
    if total == 0:
        return {f"{prefix}/num_images": 0.0}
    res = representation_bias(counts)
    out: dict[str, Any] = {f"{prefix}/share/{c}": float(s) for c, s in zip(es.classnames, res["share"].tolist())}
    out[f"{prefix}/bias"] = res["bias"]
    out[f"{prefix}/num_images"] = total
    out["_tables"] = {prefix: [[c, float(s)] for c, s in zip(es.classnames, res["share"].tolist())]}
    return out


def _association_bias(es, model, tokenizer, loader, device, max_batches, prefix):
    """Second-order bias (siglip2.eval.bias): the (attribute value x predicted concept) counts,
    summed over ranks, then P_a(c) and the mean over concepts of max_a P_a(c) - min_a P_a(c).
    `_tables[prefix]`: [concept, gap] rows; `_tables[prefix + "/by_attribute"]`:
    ["concept | value", P_value(concept)] rows."""
    pred, attribute = _zeroshot_predictions(es, model, tokenizer, loader, device, max_batches, extra="attribute")
    counts = prediction_counts(pred, len(es.classnames), attribute, len(es.attributes))
    counts = dist_utils.all_reduce_sum(counts).cpu()
    per_value = counts.sum(dim=1)
    out: dict[str, Any] = {f"{prefix}/count/{a}": float(n) for a, n in zip(es.attributes, per_value.tolist())}
    out[f"{prefix}/num_images"] = float(per_value.sum())
    if int((per_value > 0).sum()) < 2:
        if per_value.sum() > 0:
            log.warning(
                "%s: images of fewer than 2 attribute values (%s), so no association bias is reported",
                prefix,
                ", ".join(f"{a}: {int(n)}" for a, n in zip(es.attributes, per_value.tolist())),
            )
        return out
    res = association_bias(counts)
    out[f"{prefix}/bias"] = res["bias"]
    out["_tables"] = {
        prefix: [[c, float(g)] for c, g in zip(es.classnames, res["gap"].tolist())],
        f"{prefix}/by_attribute": [
            [f"{c} | {a}", float(res["p"][i, j])]
            for j, c in enumerate(es.classnames)
            for i, a in enumerate(es.attributes)
        ],
    }
    return out


def _refexp(model, tokenizer, loader, device, max_batches, prefix, decoder, refexp_probe=None):
    """Every region of every image is one query: its caption in, a box out, hit at IoU >= 0.5,
    by the model's own LocCa decoder (`acc@0.5`, whole set) and/or, with `refexp_probe`, by a
    fresh decoder trained on the set's training keys (`probe_acc@0.5`, held-out keys)."""
    hits, total = torch.zeros((), device=device), torch.zeros((), device=device)
    rows = []  # the probe's per-image tokens, kept only when it runs
    for batch in _batches(loader, max_batches):
        img = _encode(model, batch, device)
        if refexp_probe is not None:
            for i, regions in enumerate(batch["regions"]):
                rows.append(
                    {
                        "key": batch["key"][i],
                        "regions": regions,
                        "tokens": img.tokens[i],
                        "token_mask": None if img.token_mask is None else img.token_mask[i],
                    }
                )
        if decoder is None:
            continue
        queries = [(i, r) for i, regions in enumerate(batch["regions"]) for r in regions]
        index = torch.tensor([i for i, _ in queries], device=device)
        tokens = img.tokens[index]
        mask = img.token_mask[index] if img.token_mask is not None else None
        with tower_autocast(device):
            predicted = predict_boxes(decoder, tokens, mask, tokenizer, [r["caption"] for _, r in queries])
        hits += refexp_accuracy(predicted, [r["box"] for _, r in queries]) * len(queries)
        total += len(queries)
    out: dict[str, Any] = {}
    if decoder is not None:
        hits, total = dist_utils.all_reduce_sum(hits), dist_utils.all_reduce_sum(total)
        out = {f"{prefix}/acc@0.5": float(hits / total.clamp_min(1)), f"{prefix}/num_regions": float(total)}
    if refexp_probe is not None:
        from siglip2.eval.refexp_probe import RefexpProbeConfig, run_refexp_probe

        res = run_refexp_probe(model, rows, tokenizer, device, RefexpProbeConfig.from_dict(refexp_probe), decoder)
        out.update({f"{prefix}/{k}": v for k, v in res.items()})
    return out


def evaluate_all(sets: list[str | EvalSet], **kwargs: Any) -> dict[str, Any]:
    """Runs every set; numbers merged into one dict, extras (`_tables`, `_examples`) merged too."""
    out: dict[str, Any] = {"_tables": {}, "_examples": {}}
    loud = dist_utils.get_rank() == 0
    for i, spec in enumerate(sets):
        es = spec if isinstance(spec, EvalSet) else load_eval_set(spec)
        started = time.monotonic()
        if loud:  # one line per set: a pass over a set can take minutes on a CPU
            log.info("evaluating %s (%s, set %d of %d)", es.name, es.task, i + 1, len(sets))
        res = evaluate_set(es, **kwargs)
        if loud:
            log.info("%s done in %.0f s", es.name, time.monotonic() - started)
        out["_tables"].update(res.pop("_tables", {}))
        out["_examples"].update(res.pop("_examples", {}))
        out.update(res)
    return out
