"""Decoding one raw WebDataset sample (member name -> bytes) into a :class:`DecodedSample`.

Only the keys we know are decoded (:data:`IMAGE_KEYS`, ``txt``, ``json``, ``seg.png``), by
our own code with PIL and json. Nothing is ever unpickled, and image formats that call out
to other programs (EPS -> Ghostscript) are never tried. A bad sample raises
:class:`BadSample` with a reason; the stream (:mod:`siglip2.data.shards`) counts it and
goes on.

Image mode policy (:func:`to_rgb`): grayscale, palette, CMYK, 16-bit are converted to RGB;
anything with transparency (RGBA, LA, palette + transparency) is composited over *white*.
Web alt-text images with alpha are mostly logos and product shots drawn for white pages;
dropping alpha instead exposes whatever colour hides under transparent pixels (often black).
EXIF orientation is ignored, as big_vision's decoder does, so boxes in the json stay
aligned with the stored pixels.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "DecodedSample",
    "BadSample",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_KEYS",
    "TEXT_KEY",
    "JSON_KEY",
    "MASK_KEY",
    "decode_sample",
    "to_rgb",
]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEY, JSON_KEY, MASK_KEY = "txt", "json", "seg.png"

# Web images often carry the wrong extension, so any of these is accepted under any image
# key; formats that call out to other programs (EPS -> Ghostscript) are never tried.
Image.init()  # register every plugin so the names below resolve
_IMAGE_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)

# A decoded 33.5 MP RGB image is ~100 MB: beyond that a single web image costs more
# worker memory and time than it is worth at 224-512 px training resolution.
DEFAULT_MAX_PIXELS = 2**25


@dataclass
class DecodedSample:
    key: str
    image: Image.Image  # RGB
    caption: str
    meta: dict = field(default_factory=dict)
    mask: np.ndarray | None = None  # uint8 (H, W) when decode_mask=True and present


class BadSample(Exception):
    """Raised by :func:`decode_sample` (or a ``sample_fn``) to skip a sample.

    ``reason`` is a key of :data:`siglip2.data.shards.SKIP_REASONS` (the stream counts
    skips by it); ``detail`` is free text for the warning.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white (module doc).

    16-bit and 32-bit integer/float modes are scaled to 8 bit (``I;16*`` divided by 257,
    ``I`` only when its maximum exceeds 255). Returns ``img`` itself when already RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "L" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode_image(data: bytes, max_pixels: int, decode_size: tuple[int, int] | None = None) -> Image.Image:
    if not data:
        raise BadSample("bad_image", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)  # header only
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("too_large", f"{w}x{h} > max_pixels={max_pixels}")
            if decode_size is not None and img.format == "JPEG":
                # DCT-domain downscale by 1/2, 1/4 or 1/8 while both sides stay >= decode_size
                img.draft(None, tuple(decode_size))
            img.load()
            return to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None


def _decode_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    try:
        m = Image.open(io.BytesIO(data), formats=("PNG",))
        m.load()
        if m.mode not in ("L", "P"):
            m = m.getchannel(0) if m.mode in ("RGB", "RGBA", "LA") else m.convert("L")
        arr = np.array(m, dtype=np.uint8)
    except Exception as e:
        raise BadSample("bad_mask", f"{type(e).__name__}: {e}") from None
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        raise BadSample("bad_mask", f"mask {arr.shape[1]}x{arr.shape[0]} != image {size[0]}x{size[1]}")
    return arr


def decode_caption(raw: dict) -> str:
    """The sample's ``txt`` as UTF-8 (BOM dropped, stripped). Raises ``BadSample`` with reason
    ``missing_caption``, ``bad_caption`` (not UTF-8) or ``empty_caption``."""
    if TEXT_KEY not in raw:
        raise BadSample("missing_caption")
    try:
        caption = bytes(raw[TEXT_KEY]).decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise BadSample("bad_caption") from None
    if not caption:
        raise BadSample("empty_caption")
    return caption


def decode_sample(
    raw: dict,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_mask: bool = False,
    decode_size: tuple[int, int] | None = None,
) -> DecodedSample:
    """Raw wds sample (key -> bytes) to a DecodedSample; raises :class:`BadSample` if bad.

    The image is the first of :data:`IMAGE_KEYS` present, decoded to RGB (:func:`to_rgb`);
    the caption is ``txt`` as UTF-8 (BOM dropped, stripped); ``meta`` is the ``json`` object
    or ``{}``; ``mask`` is ``seg.png`` as uint8 (H, W) when ``decode_mask`` and present.
    ``max_pixels``: width * height limit, checked from the header before decoding.

    Cheap checks first (caption, json, header size) so bad samples cost no image decode.
    ``decode_size`` (w, h) in pixels: a JPEG at least twice that size on both sides is decoded
    at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, never below ``decode_size``), which is
    faster than a full decode; the caller resizes to its own size anyway (see
    ``ImageTransform.min_source_size``). Ignored when a mask is decoded (it must match the image).

    Errors (``BadSample.reason``): ``missing_image``, ``missing_caption``, ``bad_caption``,
    ``empty_caption``, ``bad_json``, ``too_large``, ``bad_image``, ``bad_mask``.
    """
    key = raw.get("__key__", "")
    img_bytes = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    if img_bytes is None:
        raise BadSample("missing_image")
    caption = decode_caption(raw)
    meta: dict = {}
    if JSON_KEY in raw:
        try:
            meta = json.loads(bytes(raw[JSON_KEY]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BadSample("bad_json") from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"json is a {type(meta).__name__}, not an object")
    image = _decode_image(bytes(img_bytes), max_pixels, None if decode_mask else decode_size)
    mask = None
    if decode_mask and MASK_KEY in raw:
        mask = _decode_mask(bytes(raw[MASK_KEY]), image.size)
    return DecodedSample(key=key, image=image, caption=caption, meta=meta, mask=mask)
