"""The GPU check of issue 25: one script, one H100, at most 10 minutes, one markdown table.

    bash benchmarks/gpu_check.sh                 # on a machine with one GPU (H100 80 GB, 16 cores)
    bash benchmarks/gpu_check.sh --cpu-dry-run   # the same plumbing on CPU with a tiny model (~5 min on 2 cores)

What it measures (each part in its own subprocess with its own timeout; a part that fails or
times out is a FAIL row with its last error line, and the script goes on):

1. smoke: `python train.py debug=fast trainer=<t> trainer.devices=1` for each strategy
   (gpu, gpu_ddp, fsdp, fsdp2, deepspeed_stage_2; on CPU: cpu, ddp_cpu, fsdp_cpu, fsdp2_cpu,
   deepspeed_cpu), through the 80% switch (GPU: 10 steps, the switch at step 8), bf16 on the
   GPU. train.py runs unchanged (runpy) inside a wrapper that adds two callbacks to the Trainer
   and counts host syncs per step: on a GPU, the warnings of
   `torch.cuda.set_sync_debug_mode("warn")` (each is a real device sync); on CPU, the calls that
   would sync on a GPU (tests/unit/test_host_syncs.py's `SyncCensus`, which names the innermost
   frame in this repository: for a sync inside Lightning, FSDP or DeepSpeed, the line of ours
   that called into it; the GPU warnings name the innermost Python frame). "step" = after LossSchedule's
   `on_train_batch_start` up to the first `on_train_batch_end` (training_step, backward,
   clipping, optimiser, EMA teacher); "loop" = one whole loop iteration (adds Lightning's
   logging, checkpoints and the other callbacks). The smoke runs in parallel (one port each),
   so their wall seconds are under contention: they are pass/fail checks, not timings.
   Recorded: pass/fail, wall s, final train/loss, that distillation turned on
   (`schedule/local_to_global_on` / `distill/local_to_global` in metrics.json), syncs per step
   before and after the switch and the top sites after it.
2. step: B/16 at 256 px (`model=b16 model.vision.image_size=256`, Gemma's 256k vocabulary,
   random weights and inputs) at a fixed per-GPU batch (--batch, halved on OOM), bf16 autocast,
   the step a Lightning run makes (training_step, backward, `on_before_optimizer_step`
   gates, clip 1.0, AdamW as `optim.impl=auto` picks for bf16-mixed, the stage's
   `optimizer_step` with the EMA teacher update, scheduler): sigmoid alone, + LocCa, +
   distillation, all (distillation switched on with `stage.enable_loss`; "without" = built
   and dormant, as before 80%; "without LocCa" = `stage.losses.locca=null`). MFU against the
   bf16 dense peak (989 TFLOP/s for an H100 SXM, 756 PCIe, 835 NVL; --peak-tflops), with two FLOP counts: the stage's
   `measure_flops` (towers + LocCa decoder, what the ThroughputMonitor logs; it leaves out the
   distillation passes) and torch's `FlopCounterMode` over one real step (every matmul and
   attention that ran, teacher and views included). Peak `max_memory_allocated` per variant.
3. max batch: the largest per-GPU batch of the all-losses B/16@256 step that fits (doubling
   from --batch, then bisection to a multiple of 16, time-boxed), its peak memory and step time.
4. loader: `benchmarks/data_pipeline.py`'s training loader (ImageTextData, LocCa targets) on
   the demo's shards re-encoded as web-sized 500x375 JPEGs, at 256 px, 1 and 8 workers:
   samples/s and per worker, against what the step of part 2 consumes (samples/s of the
   sigmoid + LocCa step, i.e. 0-80% of pretraining, and of the all-losses step): the ratio
   loader / need and the workers one GPU needs.

Nothing is downloaded: the demo data and tokenizer are generated, weights are random.
Part 2 and 3 run while the demo is being built (setup, CPU) in the background; part 4 runs
alone after the smoke runs.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import re
import runpy
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

GPU_STRATEGIES = ["gpu", "gpu_ddp", "fsdp", "fsdp2", "deepspeed_stage_2"]
CPU_STRATEGIES = ["cpu", "ddp_cpu", "fsdp_cpu", "fsdp2_cpu", "deepspeed_cpu"]
DISTILL = ("local_to_global", "masked")
# (name, LocCa built, distillation on)
VARIANTS = [
    ("sigmoid", False, False),
    ("sigmoid+locca", True, False),
    ("sigmoid+distill", False, True),
    ("all losses", True, True),
]
SYNC_MESSAGE = "synchroniz"  # torch: "called a synchronizing CUDA operation"


# ================================================================================ helpers
def emit(path: str, record: dict) -> None:
    """Append one JSON record to a part's results file (partial results survive a kill)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def last_error_line(text: str) -> str:
    """The last line of a traceback or log that names an error, else the last non-empty line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln.strip()) for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # "RuntimeError: ...", "torch.OutOfMemoryError: ...", not Hydra's "Error executing job"
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)(:|$)", ln) or ln.startswith(("FAIL", "Killed")):
            return ln[:240]
    return lines[-1][:240] if lines else "(no output)"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Proc:
    """A subprocess in its own session (its whole group is ended on timeout), output to files."""

    def __init__(self, name: str, cmd: list[str], work: Path, env: dict | None = None):
        self.name, self.cmd = name, cmd
        self.out_path, self.err_path = work / f"{name}.stdout", work / f"{name}.stderr"
        self.start = time.time()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.p = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=err, env={**os.environ, **(env or {})}, start_new_session=True
            )
        self.rc: int | None = None
        self.timed_out = False
        self.wall = 0.0

    def wait(self, timeout: float) -> "Proc":
        try:
            self.rc = self.p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
        self.wall = time.time() - self.start
        return self

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.rc = self.p.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def failure(self) -> str:
        if self.timed_out:
            return f"timed out after {self.wall:.0f} s; last line: {last_error_line(self.stderr + self.stdout)}"
        return last_error_line(self.stderr or self.stdout)


# ================================================================================ part 1: smoke wrapper
class SyncProbe:
    """Counts host syncs in windows of the training loop: GPU = sync-debug warnings, CPU = the
    census of calls that would sync on a GPU."""

    def __init__(self, path: str):
        import torch

        self.path = path
        self.cuda = torch.cuda.is_available()
        self.method = "cuda sync_debug_mode=warn" if self.cuda else "census of sync calls (CPU)"
        self.steps: list[dict] = []
        self._ctx = None
        self._log: list = []
        self._census = None
        self._open: dict | None = None

    # ---- the counter
    def start(self) -> None:
        import torch

        if self.cuda:
            self._ctx = warnings.catch_warnings(record=True)
            self._log = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            try:
                sys.path.insert(0, str(ROOT / "tests" / "unit"))
                from test_host_syncs import SyncCensus
            except Exception as exc:  # the census is the test's; without it, say so
                self.method = f"n/a ({type(exc).__name__}: {exc})"
                return
            self._census = SyncCensus()
            self._census.__enter__()

    def stop(self) -> None:
        import torch

        if self.cuda and self._ctx is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        elif self._census is not None:
            self._census.__exit__(None, None, None)
            self._census = None

    def snapshot(self) -> collections.Counter:
        if self.cuda:
            sites = collections.Counter()
            for w in self._log:
                if SYNC_MESSAGE in str(w.message):
                    sites[_site(w.filename, w.lineno)] += 1
            return sites
        if self._census is not None:
            return collections.Counter({f"{where}:{call}": n for (where, call), n in self._census.sites.items()})
        return collections.Counter()

    # ---- the marks
    def step_start(self, step: int, distill: bool) -> None:
        now = self.snapshot()
        if self._open is not None:  # the previous loop iteration ends here
            self._finish_iter(now)
        self._open = {"step": step, "distill": distill, "a": now, "b": None}

    def step_end(self) -> None:
        if self._open is not None and self._open["b"] is None:
            self._open["b"] = self.snapshot()

    def finish(self) -> None:
        if self._open is not None:
            self._finish_iter(self.snapshot())
            self._open = None

    def _finish_iter(self, now: collections.Counter) -> None:
        o = self._open
        b = o["b"] if o["b"] is not None else now
        step_sites = b - o["a"]
        self.steps.append(
            {
                "step": o["step"],
                "distill": o["distill"],
                "step_syncs": sum(step_sites.values()),
                "loop_syncs": sum((now - o["a"]).values()),
                "step_sites": dict(step_sites),
            }
        )
        with open(self.path, "w") as f:
            json.dump({"method": self.method, "steps": self.steps}, f)


def _site(filename: str, lineno: int) -> str:
    path = Path(filename)
    try:
        if ".venv" not in path.parts and ROOT in path.resolve().parents:
            return f"{path.resolve().relative_to(ROOT)}:{lineno}"
    except OSError:
        pass
    parts = path.parts
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :]) + f":{lineno}"
    return f"{path.name}:{lineno}"


def train_wrapper(overrides: list[str], sync_json: str) -> None:
    """`python train.py <overrides>` in this process, with the sync probe's callbacks added."""
    import lightning as L

    import stages.runner as runner

    probe = SyncProbe(sync_json)

    class Opener(L.Callback):  # last in the list: after LossSchedule switched losses on
        def on_train_start(self, trainer, pl_module):
            probe.start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            enabled = getattr(pl_module, "loss_enabled", {})
            probe.step_start(int(trainer.global_step), any(enabled.get(n, False) for n in DISTILL))

        def on_train_end(self, trainer, pl_module):
            probe.finish()
            probe.stop()

    class Closer(L.Callback):  # first in the list: before checkpoints and evaluation
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            probe.step_end()

        def on_train_end(self, trainer, pl_module):  # the last iteration ends before the final checkpoint
            probe.finish()

    build = runner.build

    def build_with_probe(cfg):
        objs = build(cfg)
        objs["trainer"].callbacks.insert(0, Closer())
        objs["trainer"].callbacks.append(Opener())
        return objs

    runner.build = build_with_probe
    sys.argv = [str(ROOT / "train.py"), *overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def summarize_syncs(data: dict) -> str:
    steps = [s for s in data.get("steps", []) if s["step"] > 0]  # step 0: one-off first-step work
    before = [s for s in steps if not s["distill"]]
    after = [s for s in steps if s["distill"]]

    def med(rows, key):
        return "-" if not rows else f"{statistics.median(r[key] for r in rows):g} (max {max(r[key] for r in rows)})"

    sites = collections.Counter()
    for s in after or before:
        sites.update(s["step_sites"])
    top = ", ".join(f"{k} x{v}" for k, v in sites.most_common(3)) or "none"
    return (
        f"host syncs/step [{data.get('method')}]: step before {med(before, 'step_syncs')} / after "
        f"{med(after, 'step_syncs')}; loop before {med(before, 'loop_syncs')} / after {med(after, 'loop_syncs')}; "
        f"top step sites {'after' if after else 'before'} the switch: {top}"
    )


# ================================================================================ parts 2 and 3: the step
def model_overrides(cpu: bool) -> list[str]:
    if cpu:  # train_step.py's "micro" model (tiny, 32 px, 256-token vocabulary)
        import train_step as ts

        spec = ts.SIZES["micro"]
        return [
            f"model={spec['model']}",
            f"model.text.vocab_size={spec['vocab']}",
            f"model.vision.image_size={spec['image']}",
            *spec["extra"],
        ]
    return ["model=b16", "model.vision.image_size=256"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def build_step(cfg, device, batch: int, total_steps: int = 10_000):
    """The stage, optimiser and scheduler as a Lightning run builds them, and one step as its
    automatic optimisation runs it (bf16 autocast on a GPU)."""
    from types import SimpleNamespace

    import torch

    from stages.runner import build_stage

    vocab = int(cfg.model.text.vocab_size)
    try:
        with torch.device(device):
            stage = build_stage(cfg, vocab_size=vocab)
    except Exception:  # a builder that insists on host tensors: build there, then move
        stage = build_stage(cfg, vocab_size=vocab)
    stage = stage.to(device)  # also sets LightningModule.device (views' generator)
    stage.configure_model()
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    stage._trainer = SimpleNamespace(
        estimated_stepping_batches=total_steps,
        global_step=0,
        precision=precision,
        world_size=1,
        accumulate_grad_batches=1,
        strategy=None,
        datamodule=SimpleNamespace(batch_size=batch),
    )
    conf = stage.configure_optimizers()
    stage._trainer = None  # outside a Trainer: self.log is a no-op
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    params = [p for g in opt.param_groups for p in g["params"]]
    clip = float(cfg.optim.grad_clip or 0.0)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    stage.train()

    def step(b, i: int = 0):
        def closure():
            with autocast:
                loss = stage.training_step(b, i)
            loss.backward()
            stage.on_before_optimizer_step(opt)
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            return loss

        opt.zero_grad(set_to_none=True)
        stage.optimizer_step(0, i, opt, closure)  # AdamW step (runs the closure), then the EMA teacher
        sched.step()

    return stage, opt, step


def device_batch(cfg, batch: int, locca: bool, device):
    """train_step.py's random batch (LocCa targets laid out as the loader writes them) for a
    few rows, tiled on the device to `batch` rows (the same compute as distinct rows)."""

    import train_step as ts

    base = ts.make_batch(cfg, min(batch, 32), locca)
    base["image"] = base["image"].clamp(-1, 1)
    reps = math.ceil(batch / base["image"].shape[0])
    out = {}
    for k, v in base.items():
        v = v.to(device)
        out[k] = v.repeat(reps, *([1] * (v.ndim - 1)))[:batch].contiguous()
    return out


def free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # RSS high-water mark (monotonic)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(args, device) -> tuple[float, str]:
    """(FLOP/s to divide by, what it is): the GPU's bf16 dense peak, or on CPU the fp32 matmul
    rate benchmarks/mfu.py measures."""
    import torch

    if device.type == "cuda":
        tflops, name = args.peak_tflops, torch.cuda.get_device_name(device)
        if tflops is None:  # the H100's bf16 dense peak by form factor (SXM 989, NVL 835, PCIe 756)
            tflops = 756.0 if "PCIe" in name else 835.0 if "NVL" in name else 989.0
        return tflops * 1e12, f"bf16 dense peak {tflops:g} TFLOP/s"
    import mfu

    return mfu.matmul_rate(512), "measured fp32 matmul rate (benchmarks/mfu.py)"


def matmul_bf16_rate(device) -> float | None:
    """Achieved bf16 matmul FLOP/s (8192^3), for context next to the nominal peak."""
    import torch

    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    rate = 10 * 2 * n**3 / (time.perf_counter() - t0)
    del a, b
    return rate


def setup_worker_torch(args):
    import torch

    warnings.filterwarnings("ignore")
    if args.cpu_dry_run:
        torch.set_num_threads(1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("RuntimeError: no CUDA device (use --cpu-dry-run on a machine without a GPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")


def part_step(args) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = setup_worker_torch(args)
    deadline = time.time() + args.time_box
    peak, peak_what = peak_flops(args, device)
    mm = matmul_bf16_rate(device)
    emit(
        args.jsonl,
        {
            "kind": "device",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "peak": peak,
            "peak_what": peak_what,
            "matmul_bf16": mm,
            "torch": torch.__version__,
        },
    )
    batch = args.batch
    warmup, steps = (1, 2) if args.cpu_dry_run else (3, 10)
    for name, locca, distill in VARIANTS:
        if time.time() > deadline:
            emit(args.jsonl, {"kind": "step", "variant": name, "ok": False, "error": "skipped: time box spent"})
            continue
        torch.manual_seed(0)
        stage = step = b = None
        try:
            cfg = compose(model_overrides(args.cpu_dry_run) + ([] if locca else ["stage.losses.locca=null"]))
            while True:
                try:
                    stage, _, step = build_step(cfg, device, batch)
                    if distill:
                        for n in DISTILL:
                            if n in stage.losses:
                                stage.enable_loss(n)
                    b = device_batch(cfg, batch, locca, device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    with FlopCounterMode(display=False) as counter:
                        step(b, 0)
                    break
                except torch.OutOfMemoryError:
                    stage = step = b = None
                    free(device)
                    if batch <= 8:
                        raise
                    batch //= 2  # the fixed batch does not fit: the next variants use the half too
            counted = counter.get_total_flops()
            measured = stage.measure_flops(batch)
            for i in range(1, warmup):
                step(b, i)
            sync(device)
            start = time.perf_counter()
            for i in range(steps):
                step(b, warmup + i)
            sync(device)
            step_s = (time.perf_counter() - start) / steps
            emit(
                args.jsonl,
                {
                    "kind": "step",
                    "variant": name,
                    "ok": True,
                    "batch": batch,
                    "step_s": step_s,
                    "samples_s": batch / step_s,
                    "flops_measure": measured,
                    "flops_counted": counted,
                    "mfu_measure": measured / step_s / peak,
                    "mfu_counted": counted / step_s / peak,
                    "peak_mb": peak_mb(device),
                    "steps": steps,
                    "image": int(cfg.model.vision.image_size),
                    "vocab": int(cfg.model.text.vocab_size),
                },
            )
        except Exception as exc:
            emit(
                args.jsonl,
                {
                    "kind": "step",
                    "variant": name,
                    "ok": False,
                    "batch": batch,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200],
                },
            )
        stage = step = b = None
        free(device)


def part_maxbatch(args) -> None:
    import torch

    device = setup_worker_torch(args)
    deadline = time.time() + args.time_box
    cfg = compose(model_overrides(args.cpu_dry_run))
    stage, opt, step = build_step(cfg, device, args.batch)
    for n in DISTILL:
        if n in stage.losses:
            stage.enable_loss(n)
    gran = 2 if args.cpu_dry_run else 16
    cap = args.batch * 2 if args.cpu_dry_run else 1 << 16  # CPU: plumbing only, two rungs

    def probe(bsz: int) -> dict:
        b = None
        try:
            b = device_batch(cfg, bsz, True, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step(b, 0)  # first: optimiser state exists from the first probe on
            sync(device)
            start = time.perf_counter()
            step(b, 1)
            sync(device)
            return {"batch": bsz, "fits": True, "peak_mb": peak_mb(device), "step_s": time.perf_counter() - start}
        except torch.OutOfMemoryError:
            return {"batch": bsz, "fits": False}
        finally:
            b = None
            opt.zero_grad(set_to_none=True)
            free(device)

    lo, hi, bsz = None, None, args.batch
    total = torch.cuda.get_device_properties(device).total_memory / 2**20 if device.type == "cuda" else None
    while time.time() < deadline:
        r = probe(bsz)
        r["kind"], r["total_mb"] = "probe", total
        emit(args.jsonl, r)
        if r["fits"]:
            lo = r
        else:
            hi = bsz
        if hi is None:
            if bsz * 2 > cap:
                break
            bsz *= 2
        elif lo is None:
            if bsz <= gran:
                break
            bsz //= 2
        else:
            if hi - lo["batch"] <= gran:
                break
            bsz = (lo["batch"] + hi) // 2 // gran * gran
            if bsz <= lo["batch"]:
                break
    emit(
        args.jsonl,
        {
            "kind": "max",
            "best": lo,
            "first_oom": hi,
            "total_mb": total,
            "capped": hi is None and lo is not None,
            "time_box_spent": time.time() >= deadline,
        },
    )


# ================================================================================ part 4: the loader
def timed_after_first_round(loader, workers: int) -> float:
    """Samples/s from the moment every worker has delivered its first batch (start-up is not
    throughput) to the end."""
    it = iter(loader)
    for _ in range(workers):
        next(it)
    start, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["key"])
    return n / (time.perf_counter() - start)


def part_setup(args) -> None:
    """The demo (debug=fast's n=400 split, the smoke runs' data) and its web-sized copy."""
    warnings.filterwarnings("ignore")
    import data_pipeline as dp
    from siglip2.data.demo import ensure_demo
    from siglip2.data.shards import expand_urls

    t0 = time.time()
    demo = ensure_demo(os.path.join(args.cache, "demo-n400-s0"), num_train=400)
    t1 = time.time()
    dp.resized_shards(expand_urls(demo.train_urls), f"{demo.root}-web{args.web_size}", _wh(args.web_size))
    emit(args.jsonl, {"kind": "setup", "demo_s": t1 - t0, "web_s": time.time() - t1, "root": demo.root})


def _wh(text: str) -> tuple[int, int]:
    w, h = text.split("x")
    return int(w), int(h)


def part_data(args) -> None:
    warnings.filterwarnings("ignore")
    import torch

    import data_pipeline as dp
    from siglip2.data.demo import ensure_demo
    from siglip2.data.shards import expand_urls

    torch.set_num_threads(1)
    demo = ensure_demo(os.path.join(args.cache, "demo-n400-s0"), num_train=400)
    urls = dp.resized_shards(expand_urls(demo.train_urls), f"{demo.root}-web{args.web_size}", _wh(args.web_size))
    px = 64 if args.cpu_dry_run else 256
    for w in args.workers:
        batches = args.loader_batches * w
        try:
            data = dp.build_data(demo, px, args.loader_batch, batches + w, workers=w, shards=urls)
            rate = timed_after_first_round(data.train_dataloader(), w)
            emit(
                args.jsonl,
                {
                    "kind": "loader",
                    "workers": w,
                    "ok": True,
                    "px": px,
                    "batch": args.loader_batch,
                    "samples": batches * args.loader_batch,
                    "samples_s": rate,
                    "per_worker": rate / w,
                },
            )
        except Exception as exc:
            emit(
                args.jsonl, {"kind": "loader", "workers": w, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
            )


# ================================================================================ the driver
class Report:
    def __init__(self, args, header: list[str]):
        self.args, self.header, self.rows = args, header, []

    def add(self, part: str, check: str, result: str, wall, figures: str) -> None:
        self.rows.append((part, check, result, "" if wall is None else f"{wall:.0f}", figures))
        self.write()

    def text(self) -> str:
        lines = [*self.header, "", "| part | check | result | wall s | figures |", "|---|---|---|---|---|"]
        rows = sorted(self.rows, key=lambda r: r[0])  # by part (stable: the order within a part stays)
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(self.text())


def git_commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except Exception:
        return "?"


def worker_cmd(part: str, args, jsonl: Path, time_box: float) -> list[str]:
    cmd = [
        sys.executable,
        __file__,
        "--part",
        part,
        "--jsonl",
        str(jsonl),
        "--time-box",
        f"{time_box:.0f}",
        "--batch",
        str(args.batch),
        "--cache",
        args.cache,
        "--web-size",
        args.web_size,
        "--loader-batch",
        str(args.loader_batch),
        "--loader-batches",
        str(args.loader_batches),
        "--workers",
        *map(str, args.workers),
    ]
    cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    return cmd + (["--cpu-dry-run"] if args.cpu_dry_run else [])


def fmt_flop(f: float) -> str:
    return f"{f / 1e12:.2f} T" if f >= 1e11 else f"{f / 1e9:.3g} G"


def fmt_gb(mb) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f} GB"


def driver(args) -> None:
    t_start = time.time()
    deadline = t_start + args.budget
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dry = args.cpu_dry_run
    env = {
        "WANDB_MODE": "disabled",
        "HYDRA_FULL_ERROR": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "SIGLIP2_CACHE": args.cache,
    }
    T = (
        {"step": 150, "maxbatch": 110, "smoke": 170, "data": 75}
        if not dry
        else {"step": 120, "maxbatch": 60, "smoke": 200, "data": 60}
    )
    later_min = 30  # seconds kept for each part still to come

    def time_for(part: str, after: int) -> float:
        return min(T[part], deadline - time.time() - later_min * after)

    header = [
        f"# GPU check ({'CPU dry run: plumbing only, not a measurement' if dry else 'one GPU'})",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
        f"host {platform.node()}, {os.cpu_count()} CPUs; budget {args.budget:.0f} s",
    ]
    report = Report(args, header)
    log = lambda msg: print(f"[gpu_check {time.time() - t_start:5.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    # setup (CPU) in the background while the GPU parts run
    (work / "setup.jsonl").unlink(missing_ok=True)
    setup = Proc("setup", worker_cmd("setup", args, work / "setup.jsonl", 0), work, env)

    # ---- part 2: the step
    steps: dict[str, dict] = {}
    for part, after in (("step", 3), ("maxbatch", 2)):
        jsonl = work / f"{part}.jsonl"
        jsonl.unlink(missing_ok=True)
        budget = time_for(part, after)
        if budget < 15:
            report.add("2" if part == "step" else "3", part, "SKIP", None, "no time left in the budget")
            continue
        log(f"part {part}: up to {budget:.0f} s")
        proc = Proc(part, worker_cmd(part, args, jsonl, budget - 10), work, env).wait(budget)
        recs = read_records(jsonl)
        dev = next((r for r in recs if r["kind"] == "device"), None)
        if dev and part == "step":
            mm = (
                f", achieved bf16 matmul 8192^3 {dev['matmul_bf16'] / 1e12:.0f} TFLOP/s"
                if dev.get("matmul_bf16")
                else ""
            )
            report.header.append(
                f"device: {dev['device']}; torch {dev['torch']}; MFU against the {dev['peak_what']}{mm}"
            )
        if part == "step":
            model = "micro model (tiny, 32 px), fp32 CPU" if dry else "B/16 @ 256 px, vocab 256k, bf16 autocast"
            for r in [r for r in recs if r["kind"] == "step"]:
                check = f"step {model}: {r['variant']}" + (f", batch {r['batch']}" if r.get("batch") else "")
                if r["ok"]:
                    steps[r["variant"]] = r
                    mem = "RSS high-water" if dry else "peak allocated"
                    report.add(
                        "2",
                        check,
                        "PASS",
                        None,
                        f"{r['step_s'] * 1e3:.1f} ms/step, {r['samples_s']:.1f} samples/s; "
                        f"FLOP/step {fmt_flop(r['flops_measure'])} (measure_flops) / "
                        f"{fmt_flop(r['flops_counted'])} (counted); MFU {r['mfu_measure']:.1%} / "
                        f"{r['mfu_counted']:.1%}; {mem} {fmt_gb(r['peak_mb'])}",
                    )
                else:
                    report.add("2", check, "FAIL", None, r["error"])
            if not [r for r in recs if r["kind"] == "step"] or proc.rc != 0:
                if proc.rc != 0:
                    report.add(
                        "2",
                        f"step worker ({len(steps)} of {len(VARIANTS)} variants done)",
                        "FAIL",
                        proc.wall,
                        proc.failure(),
                    )
        else:
            best = next((r for r in recs if r["kind"] == "max"), None)
            probes = [r for r in recs if r["kind"] == "probe"]
            ladder = ", ".join(f"{p['batch']}{'' if p['fits'] else ' OOM'}" for p in probes)
            if best and best["best"]:
                b = best["best"]
                note = (
                    " (CPU: capped at 2 rungs, no OOM possible)"
                    if dry
                    else " (ladder capped)"
                    if best["capped"]
                    else f"; first OOM at {best['first_oom']}"
                    + (" (time box spent before bisection ended)" if best["time_box_spent"] else "")
                )
                mem = (
                    f"RSS high-water {fmt_gb(b['peak_mb'])}"
                    if dry
                    else f"peak allocated {fmt_gb(b['peak_mb'])} of {fmt_gb(best['total_mb'])}"
                )
                report.add(
                    "3",
                    "largest per-GPU batch, all losses" + (" (micro, CPU)" if dry else ", B/16 @ 256"),
                    "PASS",
                    proc.wall,
                    f"batch {b['batch']}: {mem}, {b['step_s'] * 1e3:.0f} ms/step "
                    f"({b['batch'] / b['step_s']:.1f} samples/s){note}; probes: {ladder}",
                )
            else:
                fits = [p for p in probes if p["fits"]]
                extra = f"; probes: {ladder}" if ladder else ""
                if fits:  # killed before the summary: the probes say enough
                    b = max(fits, key=lambda p: p["batch"])
                    report.add(
                        "3",
                        "largest per-GPU batch, all losses",
                        "PARTIAL",
                        proc.wall,
                        f"at least batch {b['batch']} ({fmt_gb(b['peak_mb'])}); {proc.failure()}{extra}",
                    )
                else:
                    report.add("3", "largest per-GPU batch, all losses", "FAIL", proc.wall, proc.failure() + extra)
        log(f"part {part}: rc {proc.rc} in {proc.wall:.0f} s")

    # ---- setup must be done before the smoke runs and the loader
    setup.wait(max(5.0, min(120.0, deadline - time.time() - later_min * 2)))
    srec = next((r for r in read_records(work / "setup.jsonl") if r["kind"] == "setup"), None)
    if setup.rc != 0 or srec is None:
        report.add("0", "setup: demo data (n=400) and web-sized copy", "FAIL", setup.wall, setup.failure())
    log(f"setup: rc {setup.rc} in {setup.wall:.0f} s")

    # ---- part 1: smoke runs of every strategy, in parallel
    strategies = CPU_STRATEGIES if dry else GPU_STRATEGIES
    budget = time_for("smoke", 1)
    procs = []
    extra = ["trainer.max_steps=5", "data.batch_size=4"] if dry else ["trainer.max_steps=10"]
    for i, t in enumerate(strategies):
        if not (ROOT / "conf" / "trainer" / f"{t}.yaml").exists():
            report.add("1", f"smoke trainer={t}", "SKIP", None, f"conf/trainer/{t}.yaml does not exist (yet)")
            continue
        if budget < 20:
            report.add("1", f"smoke trainer={t}", "SKIP", None, "no time left in the budget")
            continue
        logs = work / "logs" / t
        sync_json = work / f"syncs_{t}.json"
        sync_json.unlink(missing_ok=True)
        overrides = [
            "debug=fast",
            f"trainer={t}",
            "trainer.devices=1",
            *extra,
            f"paths.cache_dir={args.cache}",
            f"paths.log_dir={logs}",
        ]
        penv = {
            **env,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(29500 + 17 * (i + 1)),
            "OMP_NUM_THREADS": "1" if dry else "3",
        }
        cmd = [sys.executable, __file__, "--part", "train", "--sync-json", str(sync_json), "--", *overrides]
        procs.append((t, overrides, sync_json, Proc(f"smoke_{t}", cmd, work, penv)))
    if procs:
        log(f"part smoke: {len(procs)} strategies in parallel, up to {budget:.0f} s")
    end = time.time() + budget
    for t, overrides, sync_json, proc in procs:
        proc.wait(end - time.time())
        check = f"smoke trainer={t}: `python train.py {' '.join(o for o in overrides if not o.startswith('paths.'))}`"
        syncs = summarize_syncs(json.loads(sync_json.read_text())) if sync_json.exists() else "no sync record"
        metrics_line = [ln for ln in proc.stdout.splitlines() if "metrics written to " in ln]
        if proc.rc != 0 or not metrics_line:
            report.add("1", check, "FAIL", proc.wall, f"{proc.failure()}; {syncs}")
            continue
        metrics = json.loads(Path(metrics_line[-1].split("metrics written to ")[-1].strip()).read_text())
        on = metrics.get("schedule/local_to_global_on") == 1.0 or "distill/local_to_global" in metrics
        want = int(next(o for o in extra if o.startswith("trainer.max_steps")).split("=")[1])
        loss = metrics.get("train/loss")
        ok = on and metrics.get("global_step") == want and loss is not None and math.isfinite(loss)
        why = (
            ""
            if ok
            else ("distillation never turned on; " if not on else "")
            + (f"stopped at step {metrics.get('global_step')}; " if metrics.get("global_step") != want else "")
        )
        report.add(
            "1",
            check,
            "PASS" if ok else "FAIL",
            proc.wall,
            f"{why}step {metrics.get('global_step'):.0f}, train/loss {loss:.4f}, distillation on: {on} "
            f"(local_to_global {metrics.get('distill/local_to_global', float('nan')):.3f}, masked "
            f"{metrics.get('distill/masked', float('nan')):.3f}); {syncs}",
        )
    if procs:
        log(f"part smoke: done at {time.time() - t_start:.0f} s")

    # ---- part 4: the loader against the step's need
    jsonl = work / "data.jsonl"
    jsonl.unlink(missing_ok=True)
    budget = time_for("data", 0)
    if budget < 15:
        report.add("4", "loader", "SKIP", None, "no time left in the budget")
    else:
        log(f"part data: up to {budget:.0f} s")
        proc = Proc("data", worker_cmd("data", args, jsonl, budget), work, env).wait(budget)
        recs = [r for r in read_records(jsonl) if r["kind"] == "loader"]
        need = {k: steps[k]["samples_s"] for k in ("sigmoid+locca", "all losses") if k in steps}
        per1 = next((r["per_worker"] for r in recs if r["ok"] and r["workers"] == 1), None)
        for r in recs:
            check = f"loader, {r['workers']} worker(s), web {args.web_size} JPEGs" + (
                f" -> {r['px']} px, batch {r['batch']}" if r.get("px") else ""
            )
            if not r["ok"]:
                report.add("4", check, "FAIL", None, r["error"])
                continue
            figs = f"{r['samples_s']:.0f} samples/s, {r['per_worker']:.1f} per worker"
            if per1 and r["workers"] > 1:
                figs += f" ({r['per_worker'] / per1:.2f}x the 1-worker rate per worker)"
            for k, n in need.items():
                figs += (
                    f"; vs the {k} step's need {n:.0f} samples/s: ratio {r['samples_s'] / n:.2f}, "
                    f"{math.ceil(n / r['per_worker'])} workers needed at this per-worker rate"
                )
            if not need:
                figs += "; the step's need is unknown (part 2 gave no sigmoid+locca / all-losses row)"
            report.add("4", check, "PASS", None, figs)
        if proc.rc != 0 or len(recs) < len(args.workers):
            report.add("4", "loader worker", "FAIL", proc.wall, proc.failure())
        log(f"part data: rc {proc.rc} in {proc.wall:.0f} s")

    report.header.append(f"total wall {time.time() - t_start:.0f} s; raw logs under {work}")
    report.write()
    print(report.text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model, CPU strategies, 2-3 steps: plumbing")
    ap.add_argument(
        "--out",
        default=None,
        help="the markdown table (default: $OUT/gpu_check_results.md or benchmarks/gpu_check_results.md)",
    )
    ap.add_argument(
        "--work",
        default=os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"),
        help="logs, checkpoints and raw results (not under $OUT: checkpoints are large)",
    )
    ap.add_argument("--cache", default=os.environ.get("SIGLIP2_CACHE", os.path.expanduser("~/.cache/siglip2")))
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 570; dry run 290)")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch of part 2, start of part 3 (default 128)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 dense peak for MFU (default by the device's name: H100 SXM 989, NVL 835, PCIe 756)",
    )
    ap.add_argument("--web-size", default="500x375")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="loader workers to time (default 1 8)")
    ap.add_argument("--loader-batch", type=int, default=None)
    ap.add_argument("--loader-batches", type=int, default=None, help="timed batches per worker")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--time-box", type=float, default=60, help=argparse.SUPPRESS)
    ap.add_argument("--sync-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dry = args.cpu_dry_run
    args.batch = args.batch or (8 if dry else 128)
    args.budget = args.budget or (290 if dry else 570)
    args.workers = args.workers or ([1, 2] if dry else [1, 8])
    args.loader_batch = args.loader_batch or (16 if dry else 64)
    args.loader_batches = args.loader_batches or (3 if dry else 6)
    if args.part == "train":
        train_wrapper(args.overrides, args.sync_json)
        return
    if args.part:
        {"step": part_step, "maxbatch": part_maxbatch, "setup": part_setup, "data": part_data}[args.part](args)
        return
    if args.out is None:
        out = os.environ.get("OUT")
        args.out = os.path.join(out, "gpu_check_results.md") if out else str(HERE / "gpu_check_results.md")
    driver(args)


if __name__ == "__main__":
    main()
