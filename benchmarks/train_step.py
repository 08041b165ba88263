"""Training step throughput: our pretrain step vs open_clip's SigLIP training step, same shape.

Ours is the real path: `stages.pretrain.PretrainStage` instantiated from the composed Hydra
config (`conf/train.yaml` + `model=<size>` + `stage=pretrain`) exactly as `stages.runner`
does, its AdamW and schedule from `Stage.configure_optimizers`, and per step
`training_step` (compute_losses + weighted sum) -> backward -> clip_grad_norm_(1.0) ->
AdamW step -> scheduler step, i.e. what Lightning's automatic optimisation runs.
(`self.log` is a no-op outside a Trainer; `--lightning` adds a row that runs ours inside
`Trainer.fit`, logging included.)

The peer is open_clip's own training step for the same architecture: `CustomTextCLIP` with a
timm ViT (`vit_base_patch16_siglip_224` family, `global_pool='map'`, no projection, resized
to our width/depth/heads/patch/image size), open_clip's text transformer of the same size
(last-token pooling, no causal mask, tanh GELU, LN eps 1e-6: the ViT-B-16-SigLIP2 text
config), `open_clip.loss.SigLipLoss`, torch AdamW with open_clip's decay groups, clipping
at 1.0. open_clip has no LocCa decoder, so for the `locca` variant the peer adds a stock
`torch.nn.TransformerDecoder` of the same shape (pre-norm, text width/heads/MLP, half the
text depth) reading timm's un-pooled tokens, with plain `F.cross_entropy`, run on the same
three tasks (Cap, ARef, GCap) as ours.

Inputs are random (no downloads, no pretrained weights), fp32 on CPU, the same batch for both
sides, `torch.set_num_threads(--threads)` for both (default 1: see benchmarks/RESULTS.md).
Sizes: tiny = conf/model/tiny.yaml with the demo's 4000-token vocab, batch 128; b16 =
conf/model/b16.yaml at 112 px, batch 8, 32k vocab (CPU time and memory). Every (size, variant)
row runs in a fresh subprocess; inside it the implementations alternate step by step (order
rotated each round) after warm-up, and the median step time of each is reported, so machine
noise hits both.

    python benchmarks/train_step.py                  # tiny + b16-shaped, sigmoid and sigmoid+LocCa
    python benchmarks/train_step.py --quick          # tiny only, batch 32 (< 1 min)
    python benchmarks/train_step.py --compile        # adds ours with model.compile=true
    python benchmarks/train_step.py --adamw          # ours with optim.impl = loop | foreach | fused
    python benchmarks/train_step.py --lightning      # adds ours inside Trainer.fit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Per size: Hydra overrides of the model, and the benchmark's batch. The tiny vocab is the
# demo tokenizer's (4000); the B/16-shaped model uses a 32k vocab instead of Gemma's 256k so
# that four copies of the optimiser state (--adamw) fit the shared 24 GiB machine, and 112 px
# so that a step takes seconds, not half a minute, on one CPU thread.
SIZES = {
    "tiny": dict(model="tiny", vocab=4000, batch=128, quick_batch=32, image=None, warmup=2),
    "b16": dict(model="b16", vocab=32000, batch=8, image=112, warmup=1),
    # test-only: a very small model so that the benchmark's own test runs in seconds
    "micro": dict(
        model="tiny",
        vocab=256,
        batch=8,
        image=32,
        extra=[
            "model.vision.width=32",
            "model.vision.depth=1",
            "model.vision.heads=2",
            "model.vision.mlp_dim=64",
            "model.vision.posemb_grid=4",
            "model.text.width=32",
            "model.text.depth=2",
            "model.text.heads=2",
            "model.text.mlp_dim=64",
            "model.embed_dim=32",
            "model.text.max_len=16",
        ],
    ),
}
VARIANTS = ("sigmoid", "locca")


# ------------------------------------------------------------------------------- ours
def compose(size: str, overrides: list[str] = ()):
    """The composed `conf/train.yaml` for a size, as `train.py` would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    spec = SIZES[size]
    ov = [f"model={spec['model']}", f"model.text.vocab_size={spec['vocab']}", *spec.get("extra", [])]
    if spec.get("image"):
        ov.append(f"model.vision.image_size={spec['image']}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[*ov, *overrides])


def build_ours(cfg, total_steps: int = 10_000):
    """PretrainStage + its optimiser and scheduler, built as `stages.runner.build` builds them."""
    from stages.runner import build_stage

    stage = build_stage(cfg, vocab_size=int(cfg.model.text.vocab_size))
    stage.configure_model()  # compiles the towers when model.compile=true
    # The clock reads max_steps, the world size and the per-rank batch from the Trainer.
    stage._trainer = SimpleNamespace(
        estimated_stepping_batches=total_steps,
        global_step=0,
        precision="32-true",
        world_size=1,
        accumulate_grad_batches=1,
        datamodule=SimpleNamespace(batch_size=int(cfg.data.batch_size)),
    )
    conf = stage.configure_optimizers()
    stage._trainer = None  # outside a Trainer: self.log is a no-op, global_step is 0
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    clip = float(cfg.optim.grad_clip or 0.0)
    stage.train()

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = stage.training_step(batch, 0)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        sched.step()
        return loss.detach()

    return stage, opt, step


def make_batch(cfg, batch_size: int, locca: bool, seed: int = 0) -> dict:
    """Random images and token ids; LocCa inputs/targets laid out as `siglip2.data.locca_targets`
    writes them (prompt, then target, -100 where no loss, pad after)."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    size, vocab, length = int(m.vision.image_size), int(m.text.vocab_size), int(m.text.max_len)
    batch = {
        "image": torch.randn(batch_size, 3, size, size, generator=g),
        "text": torch.randint(0, vocab, (batch_size, length), generator=g),
    }
    if locca:
        # (prompt length, target length) of each task, roughly the demo's
        lens = {"cap": (1, length * 3 // 4), "aref": (length // 3, 13), "gcap": (length // 3, length // 3)}
        for task, (p, t) in lens.items():
            seq = torch.randint(1, vocab, (batch_size, length + 1), generator=g)
            target = seq[:, 1:].clone()
            pos = torch.arange(length)[None]
            target[((pos < p - 1) | (pos >= p - 1 + t)).expand_as(target)] = -100
            batch[f"locca_{task}_input"] = seq[:, :-1].contiguous()
            batch[f"locca_{task}_target"] = target
            batch[f"locca_{task}_valid"] = torch.ones(batch_size, dtype=torch.bool)
    return batch


# ------------------------------------------------------------------------------- peer
def build_peer(cfg, locca: bool):
    """open_clip SigLIP (timm MAP ViT + open_clip text tower) + SigLipLoss + torch AdamW."""
    import timm
    import torch.nn.functional as F
    from open_clip.loss import SigLipLoss
    from open_clip.model import CustomTextCLIP
    from torch import nn

    m = cfg.model
    v, t = m.vision, m.text
    text_cfg = dict(
        context_length=int(t.max_len),
        vocab_size=int(t.vocab_size),
        width=int(t.width),
        heads=int(t.heads),
        layers=int(t.depth),
        mlp_ratio=int(t.mlp_dim) / int(t.width),
        no_causal_mask=True,
        proj_bias=True,
        pool_type="last",
        norm_kwargs={"eps": 1e-6},
        act_kwargs={"approximate": "tanh"},
    )
    # The open_clip SigLIP configs name a timm ViT and pass no size through, so build the
    # same family at our shape and put it in place of the default trunk.
    vision_cfg = dict(
        image_size=int(v.image_size),
        timm_model_name="vit_base_patch16_siglip_224",
        timm_model_pretrained=False,
        timm_pool="map",
        timm_proj="none",
    )
    with torch.device("meta"):  # the B/16 default trunk is thrown away: do not initialise it
        model = CustomTextCLIP(
            embed_dim=int(m.embed_dim),
            vision_cfg=vision_cfg,
            text_cfg={"layers": 1, "width": 8, "heads": 1},
            init_logit_bias=-10.0,
            output_dict=True,
        )
    model.visual.trunk = timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        num_classes=0,
        global_pool="map",
        img_size=int(v.image_size),
        patch_size=int(v.patch_size),
        embed_dim=int(v.width),
        depth=int(v.depth),
        num_heads=int(v.heads),
        mlp_ratio=int(v.mlp_dim) / int(v.width),
    )
    from open_clip.model import _build_text_tower

    model.text = _build_text_tower(int(m.embed_dim), text_cfg)
    model.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))
    model.logit_bias = nn.Parameter(torch.tensor(-10.0))
    loss_fn = SigLipLoss()
    decoder = StockDecoder(cfg) if locca else None
    params = list(model.named_parameters()) + ([] if decoder is None else list(decoder.named_parameters()))
    # open_clip's decay rule: no decay for gains, biases and the logit scale/bias
    keep = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    o = cfg.optim
    lr = float(o.lr)
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if keep(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in params if not keep(n, p)], "weight_decay": float(o.weight_decay) / lr},
        ],
        lr=lr,
        betas=tuple(o.betas),
        eps=float(o.eps),
    )
    clip = float(o.grad_clip or 0.0)
    model.train()

    def step(batch):
        opt.zero_grad(set_to_none=True)
        if decoder is None:
            out = model(batch["image"], batch["text"])
            loss = loss_fn(**out)
        else:
            trunk = model.visual.trunk
            tokens = trunk.forward_features(batch["image"])
            image = F.normalize(model.visual.head(trunk.forward_head(tokens)), dim=-1)
            text = model.encode_text(batch["text"], normalize=True)
            loss = loss_fn(image, text, model.logit_scale.exp(), model.logit_bias) + decoder(batch, tokens)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params_only, clip)
        opt.step()
        return loss.detach()

    params_only = [p for _, p in params]
    return model, opt, step


class StockDecoder(torch.nn.Module):
    """LocCa-shaped decoder from stock torch parts: nn.TransformerDecoder (pre-norm, tanh GELU,
    LN eps 1e-6), token + learned position embeddings, Linear to the vocabulary, plain
    cross-entropy normalised per sequence, mean over the three tasks."""

    def __init__(self, cfg):
        super().__init__()
        import torch.nn.functional as F
        from torch import nn

        t = cfg.model.text
        width, depth = int(t.width), max(1, round(int(t.depth) * 0.5))
        layer = nn.TransformerDecoderLayer(
            width,
            int(t.heads),
            int(t.mlp_dim),
            dropout=0.0,
            activation=lambda x: F.gelu(x, approximate="tanh"),
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(width, eps=1e-6))
        self.embed = nn.Embedding(int(t.vocab_size) + 1, width)
        self.pos = nn.Parameter(torch.randn(int(t.max_len), width) * width**-0.5)
        self.head = nn.Linear(width, int(t.vocab_size))
        self.length = int(t.max_len)

    def forward(self, batch, image_tokens):
        import torch.nn.functional as F

        mask = torch.nn.Transformer.generate_square_subsequent_mask(self.length)
        total = 0.0
        for task in ("cap", "aref", "gcap"):
            x = self.embed(batch[f"locca_{task}_input"]) + self.pos
            h = self.decoder(x, image_tokens, tgt_mask=mask, tgt_is_causal=True)
            target = batch[f"locca_{task}_target"]
            ce = F.cross_entropy(self.head(h).flatten(0, 1), target.flatten(), reduction="none").view_as(target)
            n = (target != -100).sum(1).clamp_min(1)
            total = total + (ce.sum(1) / n).mean()
        return total / 3


# ------------------------------------------------------------------------------- workers
def worker(args) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, variant = args.worker
    locca = variant == "locca"
    overrides = [] if locca else ["~stage.losses.locca"]
    impls = {}
    cfg = compose(size, overrides)
    if args.mode == "peer":
        impls["ours"] = build_ours(cfg)[2]
        impls["open_clip"] = build_peer(cfg, locca)[2]
        if args.compile:
            impls["ours+compile"] = build_ours(compose(size, overrides + ["model.compile=true"]))[2]
    elif args.mode == "adamw":
        for impl in ("loop", "foreach", "fused"):
            impls[f"adamw:{impl}"] = build_ours(compose(size, overrides + [f"optim.impl={impl}"]))[2]
        impls["open_clip"] = build_peer(cfg, locca)[2]
    batch = make_batch(cfg, args.batch, locca)
    bsz = batch["image"].shape[0]
    times = {k: [] for k in impls}
    losses = {}
    names = list(impls)
    for name in names:  # warm-up: optimiser state, allocator, compilation
        for _ in range(args.warmup):
            losses[name] = float(impls[name](batch))
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            impls[name](batch)
            times[name].append(time.perf_counter() - start)
    return {
        "size": size,
        "variant": variant,
        "batch": bsz,
        "image": int(cfg.model.vision.image_size),
        "threads": torch.get_num_threads(),
        "loss0": losses,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "all_s": times,
    }


def lightning_worker(args) -> dict:
    """Ours inside `Trainer.fit` (logging and Lightning's loop included), alternating with
    open_clip's step, which runs inside a callback between two of our steps."""
    import lightning as L

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    size, variant = args.worker
    locca = variant == "locca"
    overrides = [] if locca else ["~stage.losses.locca"]
    cfg = compose(size, overrides)
    from hydra.utils import instantiate

    stage = instantiate(
        cfg.stage,
        model=cfg.model,
        optim=cfg.optim,
        vocab_size=int(cfg.model.text.vocab_size),
        seed=int(cfg.seed),
        _recursive_=False,
        _convert_="all",
    )
    peer = build_peer(cfg, locca)[2]
    batch = make_batch(cfg, args.batch, locca)
    total = args.warmup + args.repeats

    class Timer(L.Callback):
        def __init__(self):
            self.ours, self.peer, self.t0 = [], [], 0.0

        def on_train_batch_start(self, trainer, pl_module, b, i):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, out, b, i):
            self.ours.append(time.perf_counter() - self.t0)
            start = time.perf_counter()
            peer(batch)
            self.peer.append(time.perf_counter() - start)

    timer = Timer()
    loader = torch.utils.data.DataLoader([batch] * total, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        gradient_clip_val=float(cfg.optim.grad_clip),
        log_every_n_steps=10,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(stage, train_dataloaders=loader)
    ours, peer_t = timer.ours[args.warmup :], timer.peer[args.warmup :]
    return {
        "size": size,
        "variant": variant,
        "batch": batch["image"].shape[0],
        "image": int(cfg.model.vision.image_size),
        "threads": torch.get_num_threads(),
        "median_s": {"ours(Trainer)": statistics.median(ours), "open_clip": statistics.median(peer_t)},
        "all_s": {"ours(Trainer)": ours, "open_clip": peer_t},
    }


# ------------------------------------------------------------------------------- driver
def row_settings(args, size: str) -> tuple[int, int]:
    """(batch, warm-up steps) of a size under the command line."""
    spec = SIZES[size]
    batch = args.batch or (spec.get("quick_batch", spec["batch"]) if args.quick else spec["batch"])
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else spec.get("warmup", 2))
    return batch, warmup


def run_row(args, size: str, variant: str, mode: str) -> dict:
    batch, warmup = row_settings(args, size)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        size,
        variant,
        "--mode",
        mode,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(warmup),
        "--batch",
        str(batch),
    ]
    if args.compile:
        cmd.append("--compile")
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"row {size}/{variant}/{mode} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny only, batch 32, 1 warm-up step")
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    # One thread by default: on this shared 2-core machine two OpenMP threads stall whenever
    # another process takes a core, which makes every small kernel 10-100x slower (RESULTS.md).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default per size)")
    ap.add_argument("--batch", type=int, default=None, help="override the per-size batch")
    ap.add_argument("--compile", action="store_true", help="also time ours with model.compile=true")
    ap.add_argument(
        "--adamw",
        action="store_true",
        help="time ours with optim.impl = loop | foreach | fused (and open_clip); sigmoid variant only",
    )
    ap.add_argument("--lightning", action="store_true", help="also time ours inside Trainer.fit")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.warmup = 1 if args.warmup is None else args.warmup
        args.batch = args.batch or SIZES[args.worker[0]]["batch"]
        fn = lightning_worker if args.mode == "lightning" else worker
        print(json.dumps(fn(args)))
        return
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "b16"])
    modes = ["adamw"] if args.adamw else ["peer"] + (["lightning"] if args.lightning else [])
    if args.adamw:  # three copies of ours and the optimiser states: keep to the cheaper variant
        args.variants = ["sigmoid"]
    from siglip2.optim import adamw_impl

    impl = compose("micro").optim.impl
    print(
        f"training step, fp32 CPU, {args.threads} thread(s), torch {torch.__version__}, "
        f"median of {args.repeats} alternated steps after warm-up; ours: optim.impl={impl} "
        f"({adamw_impl(impl)}), open_clip: torch AdamW defaults"
    )
    if args.adamw:
        print(
            f"{'size':>5} {'variant':>8} {'batch':>5} {'px':>4} {'impl':>14} {'step s':>8} {'samples/s':>10} "
            f"{'vs foreach':>10} {'ratio ours/peer':>15}"
        )
    else:
        print(
            f"{'size':>5} {'variant':>8} {'batch':>5} {'px':>4} {'ours':>14} {'ours/s':>8} "
            f"{'peer/s':>8} {'ratio ours/peer':>15}"
        )
    for size in sizes:
        for variant in args.variants:
            for mode in modes:
                r = run_row(args, size, variant, mode)
                med, b = r["median_s"], r["batch"]
                head = f"{size:>5} {variant:>8} {b:>5} {r['image']:>4}"
                if mode == "adamw":
                    base, peer = med["adamw:foreach"], med["open_clip"]
                    for name, sec in med.items():
                        vs = f"{base / sec:>10.2f}" if name != "open_clip" else f"{'':>10}"
                        print(f"{head} {name:>14} {sec:>8.3f} {b / sec:>10.2f} {vs} {peer / sec:>15.2f}")
                    continue
                peer = med["open_clip"]
                for name, sec in med.items():
                    if name == "open_clip":
                        continue
                    print(f"{head} {name:>14} {b / sec:>8.2f} {b / peer:>8.2f} {peer / sec:>15.2f}")
                    if name == "ours+compile":
                        print(f"{head} {'compiled/eager':>14} {'':>8} {'':>8} {med['ours'] / sec:>15.2f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
