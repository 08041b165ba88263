"""Data pipeline throughput per worker: our shard pipeline vs the decode-only floor.

Ours is the training loader exactly as a run builds it: `stages.data.ImageTextData` from the
composed `conf/train.yaml` (data=demo, stage=pretrain, so LocCa targets are built too), its
`train_dataloader()` = `siglip2.data.shards.build_train_loader` with one worker: resampled
shards, tar read, decode, resize to the model's image size and [-1, 1], caption tokens,
LocCa targets, collate. The floor is the least any loader must do with the same data: read the
same demo tars with the standard library's `tarfile` and PIL-decode every JPEG to RGB, also in
one DataLoader worker, nothing else.

Both are timed from their first batch (worker start-up is not throughput) over the same
number of samples; passes alternate ours / floor, and the median of --repeats passes is
reported. The demo (`siglip2.data.demo.ensure_demo(root, num_train=2000)`) is built on first
use under --root.

The demo's JPEGs are small (short side 64..160 px, ~0.2 ms to decode), so the floor is very
cheap and every fixed per-sample cost shows. Web-sized rows use a copy of the same shards with
every image resized to --web-size (default 500x375, a typical alt-text photo; quality 90,
built once next to the demo), measured at 64, 224 and 384 px: there decoding costs what it
does on real data. `--web FACTOR` instead upscales every image FACTORx (the older 224 px row).

Ours never makes float32 pixels in the workers: batches carry uint8 images, normalised on the
device by the stage. `--gpu-step` adds the arithmetic of how many such workers one B/16 step
at batch 256 on an H100-class GPU needs, from the measured 224 px web rate and the step's
FLOPs (`Stage.measure_flops`, towers + LocCa decoder, forward + backward).

    python benchmarks/data_pipeline.py            # demo 64 + 224 px; web 500x375 at 64, 224, 384 px
    python benchmarks/data_pipeline.py --quick    # 64 and 224 px, fewer samples per pass (< 1 min once built)
    python benchmarks/data_pipeline.py --breakdown   # where ours spends its time, per stage
    python benchmarks/data_pipeline.py --sizes --web-size 500x375 --web-px 224 384 --gpu-step
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

DEFAULT_ROOT = os.path.join(os.environ.get("SIGLIP2_CACHE", os.path.expanduser("~/.cache/siglip2")), "demo-n2000-s0")


def build_data(
    demo,
    image_size: int,
    batch_size: int,
    num_batches: int,
    workers: int = 1,
    shards: list[str] | None = None,
    extra: list[str] = (),
):
    """Our data module from the composed config (data=demo, stage=pretrain), as
    `stages.runner.build` makes it, reading `demo`'s shards (or `shards`) and tokenizer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from stages.runner import build_datamodule
    from siglip2.data.shards import expand_urls

    urls = shards or expand_urls(demo.train_urls)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=demo",
                "data.demo=null",
                f"data.train=[{','.join(urls)}]",
                f"tokenizer.path={demo.tokenizer_path}",
                f"model.vision.image_size={image_size}",
                f"data.batch_size={batch_size}",
                f"data.batches_per_epoch={num_batches}",
                f"data.num_workers={workers}",
                *extra,
            ],
        )
    return build_datamodule(cfg)


class DecodeFloor(IterableDataset):
    """Read the tars in order (cycling) and decode every JPEG to RGB; yield batch counts."""

    def __init__(self, urls: list[str], num_samples: int, batch_size: int):
        super().__init__()
        self.urls, self.num_samples, self.batch_size = urls, num_samples, batch_size

    def __iter__(self):
        done = in_batch = 0
        while True:
            for url in self.urls:
                with tarfile.open(url, mode="r|") as tar:
                    for member in tar:
                        if not member.name.endswith(".jpg"):
                            continue
                        data = tar.extractfile(member).read()
                        Image.open(io.BytesIO(data)).convert("RGB")
                        done += 1
                        in_batch += 1
                        if in_batch == self.batch_size:
                            yield in_batch
                            in_batch = 0
                        if done == self.num_samples:
                            return


def rewritten_shards(urls: list[str], out_dir: str, resize) -> list[str]:
    """A copy of the shards with every JPEG replaced by `resize(image)` (quality 90), built once."""
    done = os.path.join(out_dir, "DONE")
    outs = [os.path.join(out_dir, os.path.basename(u)) for u in urls]
    if os.path.exists(done):
        return outs
    os.makedirs(out_dir, exist_ok=True)
    for src, dst in zip(urls, outs):
        with tarfile.open(src, mode="r|") as tin, tarfile.open(dst + ".tmp", mode="w") as tout:
            for member in tin:
                data = tin.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    img = resize(Image.open(io.BytesIO(data)).convert("RGB"))
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=90)
                    data = buf.getvalue()
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
        os.replace(dst + ".tmp", dst)
    open(done, "w").close()
    return outs


def upscaled_shards(urls: list[str], out_dir: str, factor: int = 4) -> list[str]:
    """Every JPEG upscaled `factor`x (bicubic)."""
    return rewritten_shards(
        urls, out_dir, lambda img: img.resize((img.width * factor, img.height * factor), Image.Resampling.BICUBIC)
    )


def resized_shards(urls: list[str], out_dir: str, size: tuple[int, int]) -> list[str]:
    """Every JPEG resized to `size` (w, h) (bicubic): web-sized photos, for the decode cost of
    real alt-text data."""
    return rewritten_shards(urls, out_dir, lambda img: img.resize(size, Image.Resampling.BICUBIC))


def gpu_step_arithmetic(
    per_worker: float, batch: int = 256, image_size: int = 224, peak_tflops: float = 989.0, mfu: float = 0.4
) -> None:
    """Workers one B/16 pretraining step needs: FLOPs of the step (meta device) -> step time at
    `mfu` of an H100 SXM's dense bf16 peak -> examples/s -> / the measured per-worker rate."""
    import math
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stages.runner import build_stage

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=b16", f"model.vision.image_size={image_size}"])
    with torch.device("meta"):
        stage = build_stage(cfg, vocab_size=int(cfg.model.text.vocab_size))
    stage._trainer = SimpleNamespace(world_size=1)
    flops = stage.measure_flops(batch)
    step_s = flops / (peak_tflops * 1e12 * mfu)
    need = batch / step_s
    print(
        f"\nB/16 step, batch {batch}, {image_size} px, sigmoid + LocCa (forward + backward): {flops / 1e12:.1f} TFLOP"
    )
    print(
        f"  H100 SXM dense bf16 peak {peak_tflops:.0f} TFLOP/s x {mfu:.0%} MFU = {peak_tflops * mfu:.0f} TFLOP/s "
        f"-> {step_s * 1e3:.0f} ms a step -> {need:,.0f} examples/s"
    )
    print(
        f"  / {per_worker:.1f} examples/s per worker ({image_size} px, web-sized JPEGs, measured above) "
        f"= {need / per_worker:.1f} -> {math.ceil(need / per_worker)} loader workers (CPU cores) per GPU"
    )


def timed(loader, count) -> float:
    """Samples per second after the first batch."""
    it = iter(loader)
    count(next(it))
    start, n = time.perf_counter(), 0
    for batch in it:
        n += count(batch)
    return n / (time.perf_counter() - start)


def measure(args, demo, image_size: int, upscale: int = 1, web_size: tuple[int, int] | None = None) -> dict:
    from siglip2.data.shards import expand_urls

    num_batches = args.samples // args.batch
    urls = expand_urls(demo.train_urls)
    if web_size is not None:
        urls = resized_shards(urls, f"{demo.root}-web{web_size[0]}x{web_size[1]}", web_size)
    elif upscale > 1:
        urls = upscaled_shards(urls, f"{demo.root}-x{upscale}", upscale)
    data = build_data(demo, image_size, args.batch, num_batches, workers=1, shards=urls)
    rates = {"ours": [], "floor": []}
    for r in range(args.repeats):
        for name in ("ours", "floor") if r % 2 == 0 else ("floor", "ours"):
            if name == "ours":
                rates[name].append(timed(data.train_dataloader(), lambda b: len(b["key"])))
            else:
                floor = DataLoader(
                    DecodeFloor(urls, num_batches * args.batch, args.batch), batch_size=None, num_workers=1
                )
                rates[name].append(timed(floor, int))
    return {k: statistics.median(v) for k, v in rates.items()}


def breakdown(args, demo, image_size: int) -> None:
    """Per-stage cost of ours in this process (ms per sample), same samples for every stage."""
    from siglip2.data.decode import decode_sample
    from siglip2.data.shards import collate, expand_urls, read_shards

    torch.set_num_threads(1)
    data = build_data(demo, image_size, args.batch, 1, workers=0)
    urls = expand_urls(demo.train_urls)
    n = args.samples
    read = lambda: [s for _, s in zip(range(n), read_shards([{"url": u} for u in urls]))]  # noqa: E731
    raws = read()
    loader = data.train_dataloader()
    sample_fn = loader.dataset.sample_fn
    decoded = [decode_sample(r) for r in raws]
    steps = {
        "tar read": read,
        "PIL decode (floor)": lambda: [Image.open(io.BytesIO(r["jpg"])).convert("RGB") for r in raws],
        "decode_sample": lambda: [decode_sample(r) for r in raws],
        "image transform": lambda: [sample_fn.transform(d.image) for d in decoded],
        "caption tokens": lambda: [data.tokenizer(d.caption) for d in decoded],
        "TrainSample (all)": lambda: [sample_fn(d) for d in decoded],
    }
    out = {}
    for name, fn in steps.items():
        start = time.perf_counter()
        out[name] = fn()
        print(f"  {image_size:>4} px  {name:<20} {(time.perf_counter() - start) / n * 1e3:7.3f} ms/sample")
    items = out["TrainSample (all)"]
    start = time.perf_counter()
    for i in range(0, n - args.batch + 1, args.batch):
        collate(items[i : i + args.batch])
    print(f"  {image_size:>4} px  {'collate':<20} {(time.perf_counter() - start) / n * 1e3:7.3f} ms/sample")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", nargs="*", type=int, default=[64, 224], help="rows on the demo's own JPEGs")
    ap.add_argument(
        "--web-size",
        default=None,
        metavar="WxH",
        help="rows on the shards resized to WxH (default 500x375 in full mode; 0 = none)",
    )
    ap.add_argument("--web-px", nargs="+", type=int, default=[64, 224, 384], help="training sizes of the web rows")
    ap.add_argument(
        "--gpu-step",
        action="store_true",
        help="print the workers a B/16 step at batch 256 on an H100 needs (needs a 224 px web row)",
    )
    ap.add_argument("--samples", type=int, default=None, help="samples per timed pass")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help="demo eval split sizes (default: the demo's own, so a training run can share --root)",
    )
    ap.add_argument("--breakdown", action="store_true", help="per-stage cost of ours, in process")
    ap.add_argument(
        "--web",
        type=int,
        default=None,
        metavar="FACTOR",
        help="add a 224 px row on the shards upscaled FACTORx (default 4 in full mode, 0 = none)",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    args.batch = args.batch or (32 if args.quick else 128)
    args.samples = args.samples or (8 if args.quick else 12) * args.batch
    from siglip2.data.demo import ensure_demo

    sizes = (
        {}
        if args.eval_size is None
        else {f"num_{k}": args.eval_size for k in ("zeroshot", "retrieval", "refexp", "segmentation")}
    )
    demo = ensure_demo(args.root, num_train=args.num_train, **sizes)
    if args.breakdown:
        for size in args.sizes:
            breakdown(args, demo, size)
        return
    print(
        f"data pipeline, 1 worker, {args.samples} samples per pass (first batch not timed), batch {args.batch}, "
        f"median of {args.repeats} alternated passes; demo n={args.num_train} at {args.root}"
    )
    print(f"{'image px':>8} {'source':>10} {'ours/s':>9} {'floor/s':>9} {'ratio ours/floor':>17}")
    # (the source column is wider for web rows; the numbers stay aligned by position)
    web = args.web if args.web is not None else 0
    web_size = args.web_size if args.web_size is not None else (None if args.quick else "500x375")
    web_size = tuple(int(v) for v in web_size.split("x")) if web_size and web_size != "0" else None
    rows = [(size, 1, None) for size in args.sizes] + ([(224, web, None)] if web > 1 else [])
    rows += [(size, 1, web_size) for size in args.web_px] if web_size else []
    web_224 = None
    for size, upscale, wsize in rows:
        r = measure(args, demo, size, upscale, wsize)
        source = f"web {wsize[0]}x{wsize[1]}" if wsize else ("demo" if upscale == 1 else f"demo x{upscale}")
        print(f"{size:>8} {source:>10} {r['ours']:>9.1f} {r['floor']:>9.1f} {r['ours'] / r['floor']:>17.2f}")
        sys.stdout.flush()
        if wsize and size == 224:
            web_224 = r["ours"]
    if args.gpu_step:
        if web_224 is None:
            raise SystemExit("--gpu-step needs a 224 px web row (--web-size WxH --web-px 224)")
        gpu_step_arithmetic(web_224)


if __name__ == "__main__":
    main()
