"""A real-photo zero-shot set that needs no download: scikit-image's bundled pictures.

`python -m siglip2.data.photos --out DIR` writes ``DIR/photos.yaml`` beside one shard
(``000000.tar``) in the eval-set layout (docs/eval_data.md "Evaluation data layout"): one sample per
photo, ``jpg`` + ``txt`` (its caption) + ``json`` (``label``), classes named as a user would
prompt them. Eight photos of eight classes: far too few to measure a model, enough to check
that a run, ``eval.py`` and an export handle real RGB photos of several sizes and aspect ratios
end to end (a fine-tuned released folder, `tests/e2e/test_finetune.py`). Raises ImportError
naming the package when scikit-image is missing (`pip install scikit-image`, a dev extra).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

# skimage.data function -> (class name, caption). Only pictures shipped inside the wheel
# (no pooch download). `camera` is greyscale: written as RGB.
PHOTOS = {
    "astronaut": ("astronaut", "a photo of an astronaut in a space suit"),
    "chelsea": ("cat", "a photo of a ginger cat"),
    "coffee": ("cup of coffee", "a photo of a cup of coffee on a saucer"),
    "rocket": ("rocket", "a photo of a rocket on a launch pad"),
    "camera": ("photographer", "a black and white photo of a man with a camera"),
    "hubble_deep_field": ("galaxies", "a telescope image of many distant galaxies"),
    "immunohistochemistry": ("tissue under a microscope", "a stained tissue sample under a microscope"),
    "retina": ("retina", "a photo of the back of a human eye"),
}
TEMPLATES = ("a photo of a {c}.", "a picture of a {c}.")


def write_photo_set(out: str | Path, name: str = "photos") -> Path:
    """Write the set into `out` (created); returns the yaml's path."""
    try:
        import skimage.data
    except ImportError as e:  # a dev extra: the project itself never needs it
        raise ImportError("the photo set needs scikit-image: pip install scikit-image") from e
    import numpy as np
    import yaml
    from PIL import Image
    from webdataset import TarWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classnames = [cls for cls, _ in PHOTOS.values()]
    with TarWriter(str(out / "000000.tar")) as tw:
        for i, (fn, (cls, caption)) in enumerate(PHOTOS.items()):
            pixels = np.asarray(getattr(skimage.data, fn)())
            if pixels.ndim == 2:
                pixels = np.stack([pixels] * 3, axis=-1)
            buf = io.BytesIO()
            Image.fromarray(pixels[..., :3].astype(np.uint8)).save(buf, format="JPEG", quality=95)
            tw.write(
                {
                    "__key__": f"{i:06d}_{fn}",
                    "jpg": buf.getvalue(),
                    "txt": caption,
                    "json": json.dumps({"label": classnames.index(cls), "lang": "en", "source": f"skimage.data.{fn}"}),
                }
            )
    spec = {
        "name": name,
        "task": "zeroshot",
        "urls": "000000.tar",
        "num_samples": len(PHOTOS),
        "classnames": classnames,
        "templates": list(TEMPLATES),
        "label_key": "label",
        "lang_key": "lang",
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m siglip2.data.photos", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the shard and its yaml")
    print(write_photo_set(ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
