"""Build the objects a Hydra config names and run them; shared by train.py and tests.

This is the one place that turns a composed config into a Trainer, a stage and a data
module, so `train.py` stays a three-line entry point.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate data module, stage, callbacks, loggers and Trainer from a composed config."""
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ValueError("set either ckpt_path (resume this stage) or init_from (start a stage from weights), not both")
    resume_step = check_resume_checkpoint(str(cfg.ckpt_path)) if cfg.get("ckpt_path") else None
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(cfg)
    check_vocab(cfg, datamodule.tokenizer)
    stage = build_stage(cfg, vocab_size=datamodule.tokenizer.vocab_size)
    stage.tokenizer_record = tokenizer_record(datamodule)
    if cfg.get("init_from"):
        stage.load_weights(str(cfg.init_from))
    resolve_eval_seq_len(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:
        callbacks = drop_logger_callbacks(callbacks)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_accumulation(trainer, datamodule)
    if stage.clock_window.fit_window:  # e.g. resadapt: exactly the steps of its window of the recipe
        # From the built Trainer: its world size is the real one (devices: -1 / "auto" resolved, nodes).
        steps = stage.window_steps(global_batch_size(trainer, datamodule))
        if steps is None:
            log.warning(
                "stage %s: the recipe's length is unknown (no init_from checkpoint, no stage.clock.examples); "
                "training trainer.max_steps=%s steps",
                stage.stage_name,
                cfg.trainer.get("max_steps"),
            )
        else:
            log.info(
                "stage %s covers recipe %s: %d steps of %d ranks (trainer.max_steps=%s replaced)",
                stage.stage_name,
                list(stage.clock_window.window),
                steps,
                trainer.world_size,
                cfg.trainer.get("max_steps"),
            )
            trainer.fit_loop.epoch_loop.max_steps = steps  # what `Trainer(max_steps=...)` sets
    if resume_step is not None and 0 <= trainer.max_steps <= resume_step:
        log.warning(
            "ckpt_path %s is at step %d and this run stops at trainer.max_steps=%d: it is already "
            "finished and nothing will be trained (raise trainer.max_steps to train on; evaluate it "
            "with eval.py ckpt_path=...)",
            cfg.ckpt_path,
            resume_step,
            trainer.max_steps,
        )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return {"datamodule": datamodule, "stage": stage, "trainer": trainer, "callbacks": callbacks}


def resolve_eval_seq_len(cfg: DictConfig) -> None:
    """`eval.naflex_seq_len=auto` (conf/eval/demo.yaml): a NaFlex stage's own
    `stage.naflex.eval_seq_len`, else null (square views). A number or null passes as given."""
    if cfg.get("eval") is None or cfg.eval.get("naflex_seq_len") != "auto":
        return
    length = _select(cfg, "stage.naflex.eval_seq_len")
    with open_dict(cfg):
        cfg.eval.naflex_seq_len = int(length) if length is not None else None


def build_datamodule(cfg: DictConfig):
    """The data module of `cfg.data`, given what the stage asks of its loader (`stage_data_inputs`)."""
    return instantiate(cfg.data, **stage_data_inputs(cfg), _recursive_=False, _convert_="all")


def stage_data_inputs(cfg: DictConfig) -> dict[str, Any]:
    """What the stage asks of its loader, passed to the data module (the data group never reads
    `stage.*`): LocCa's target format (`stage.losses.locca.targets`), NaFlex's batch plan
    (`stage.naflex`) and ACID's super-batch share (`stage.acid.filter_ratio`)."""
    filter_ratio = _select(cfg, "stage.acid.filter_ratio")
    return {
        "locca_targets": _plain(_select(cfg, "stage.losses.locca.targets")),
        "naflex": _plain(_select(cfg, "stage.naflex")),
        "filter_ratio": float(filter_ratio) if filter_ratio is not None else 0.0,
    }


def check_accumulation(trainer: L.Trainer, datamodule) -> None:
    """Gradient accumulation over an epoch that is not a whole number of steps: Lightning makes
    the epoch's last optimiser step from the leftover micro-batches (Lightning #19684), a
    smaller step every epoch, silently. Refused, naming both keys. The epoch is
    `data.batches_per_epoch`, or `trainer.limit_train_batches` when that cuts it shorter (a count,
    or a fraction of the epoch, as Lightning reads it)."""
    acc, per_epoch = int(trainer.accumulate_grad_batches), getattr(datamodule, "batches_per_epoch", None)
    if acc <= 1 or not per_epoch:
        return
    per_epoch, key = int(per_epoch), "data.batches_per_epoch"
    limit = trainer.limit_train_batches
    if limit is not None:
        limited = int(limit) if isinstance(limit, int) else int(per_epoch * float(limit))
        if limited < per_epoch:
            per_epoch, key = limited, f"trainer.limit_train_batches={limit} (an epoch of {limited} batches)"
    if per_epoch % acc:
        fix = -(-per_epoch // acc) * acc
        what = f"{key}={per_epoch}" if key == "data.batches_per_epoch" else key
        raise ValueError(
            f"trainer.accumulate_grad_batches={acc} does not divide {what}: "
            f"every epoch would end with a step of {per_epoch % acc} micro-batch(es). "
            f"Make the epoch a multiple of {acc} batches (e.g. {fix})"
        )


def drop_logger_callbacks(callbacks: list[Any]) -> list[Any]:
    """Without an experiment logger (`logger=none`), the callbacks that only write to one
    (Lightning's `LearningRateMonitor` refuses to start without one) are left out, with a log line."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    kept = []
    for cb in callbacks:
        if isinstance(cb, LearningRateMonitor):
            log.info(
                "no logger configured: %s left out (it only writes to a logger; metrics.json is still written)",
                type(cb).__name__,
            )
        else:
            kept.append(cb)
    return kept


def check_resume_checkpoint(path: str) -> int | None:
    """`ckpt_path` must hold only tensors and plain values (`siglip2.checkpoint.load_plain`),
    checked before any strategy reads it: Lightning's resume is `weights_only=True` for the
    strategies that load through their CheckpointIO (single device, DDP), but FSDP's full-state
    reader and DeepSpeed's engine unpickle without that limit. A directory (a sharded or
    DeepSpeed checkpoint) has every torch/pickle file in it checked. Tensors are memory-mapped,
    so the look costs little even for a large file. Lightning's own names ("last", "hpc", ...)
    are left to Lightning, whose load is then `weights_only=True` (`run`). Returns the file's
    `global_step` (None for a directory or a file without one)."""
    from siglip2.checkpoint import load_plain

    root = Path(path)
    if root.is_file():
        state = load_plain(root, mmap=True)
        step = state.get("global_step") if isinstance(state, dict) else None
        return int(step) if isinstance(step, int) else None
    elif root.is_dir():
        from siglip2.checkpoint_zero import check_zero_checkpoint, is_zero_checkpoint

        if is_zero_checkpoint(root):  # DeepSpeed's files also pickle three small records of its own
            check_zero_checkpoint(root)
            return None
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(file, "rb") as handle:
                head = handle.read(4)
            if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # a torch.save zip or a raw pickle
                load_plain(file, mmap=True)
    return None


def check_vocab(cfg: DictConfig, tokenizer) -> None:
    """A model yaml that fixes `text.vocab_size` must match the tokenizer: a larger tokenizer
    would index past the embedding table mid-run, a smaller one leaves rows never trained."""
    from siglip2.data.tokenizer import check_vocab_size

    fixed = cfg.model.get("text", {}).get("vocab_size")
    if fixed is not None:
        check_vocab_size(
            fixed,
            tokenizer.vocab_size,
            "model.text.vocab_size",
            f"the tokenizer ({cfg.tokenizer.get('path')})",
            hint="use the model's tokenizer (e.g. tokenizer=gemma for the released sizes) or "
            "model.text.vocab_size=null to size the model from the tokenizer",
        )


def tokenizer_record(datamodule):
    """The run's `siglip2.data.tokenizer.TokenizerRecord` (what checkpoints record), or None."""
    from siglip2.data.tokenizer import TokenizerRecord

    path = getattr(datamodule, "tokenizer_path", None)
    if not path:
        return None
    return TokenizerRecord.of(path, datamodule.tokenizer)


def global_batch_size(trainer: L.Trainer, datamodule) -> int:
    """Examples per optimiser step: per-rank batch (its mean, when batches vary) x the Trainer's
    world size (devices x nodes, as Lightning resolved `devices: -1`, "auto", a count or a
    list) x gradient accumulation. Read from the built Trainer, never from the config's
    `devices` literal (-1 would count as one device)."""
    per_rank = float(getattr(datamodule, "mean_batch_size", datamodule.batch_size))  # NaFlex halves some batches
    return max(1, round(per_rank * int(trainer.world_size) * int(trainer.accumulate_grad_batches)))


def build_stage(cfg: DictConfig, vocab_size: int):
    """The stage (LightningModule) a composed config names, with its model and losses."""
    return instantiate(
        cfg.stage,
        model=cfg.model,
        optim=cfg.optim,
        vocab_size=int(vocab_size),
        seed=int(cfg.seed),
        _recursive_=False,
        _convert_="all",
    )


# Variables Lightning's subprocess launcher sets in the parent for the ranks it starts.
_DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def sweep_job_ddp(trainer: L.Trainer) -> Iterator[None]:
    """In a Hydra sweep (`-m`), let DDP on local processes run one job at a time, correctly.

    Lightning starts ranks 1..n-1 by re-running ``sys.argv`` with ``hydra.run.dir`` set to
    ``HydraConfig.run.dir``. In a sweep that command line is the whole sweep: each child would
    start a sweep of its own and join the parent's jobs in lockstep, or with another job's
    overrides. Inside this context the children get this job's own overrides and output dir
    (a plain single run); afterwards the process group and the launcher's environment are
    cleared so that the next job of the sweep starts fresh ranks on a fresh port.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from omegaconf import read_write

    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if (
        hydra_cfg is None
        or hydra_cfg.mode != RunMode.MULTIRUN
        or not isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
    ):
        yield
        return
    saved_argv, saved_run_dir = sys.argv, hydra_cfg.run.dir
    saved_env = {k: os.environ.get(k) for k in _DDP_LAUNCH_ENV}
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(cfg: DictConfig) -> float | None:
    from stages.quiet import quiet_known_noise

    quiet_known_noise()
    if cfg.get("recipe"):  # experiment=recipe_*: a chain of stages, each its own train.py run
        from recipe import run_recipe

        return run_recipe(cfg)
    objs = build(cfg)
    trainer: L.Trainer = objs["trainer"]
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with sweep_job_ddp(trainer):
        try:
            # weights_only: the resumed file holds tensors and plain values only (build checked it)
            trainer.fit(objs["stage"], datamodule=objs["datamodule"], ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        except SIGTERMException:  # callbacks.StageCheckpoints saved last.ckpt; never look successful
            if any(getattr(cb, "interrupted", False) for cb in trainer.callbacks):
                log.error("interrupted by Ctrl-C at step %d; exit code 130", trainer.global_step)
                raise SystemExit(130) from None
            log.error("stopped by SIGTERM at step %d; exit code 143", trainer.global_step)
            raise SystemExit(143) from None
        metrics = collect_metrics(trainer, objs["callbacks"])
    out_dir = Path(cfg.paths.output_dir)
    write_metrics(metrics, out_dir / "metrics.json")
    objective = metrics.get(str(cfg.get("objective", "")))
    return float(objective) if objective is not None and math.isfinite(objective) else None


def collect_metrics(trainer: L.Trainer, callbacks: list[Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if torch.is_tensor(value) and value.numel() == 1:
            metrics[key] = float(value)
        elif isinstance(value, (int, float)):
            metrics[key] = float(value)
    for cb in callbacks:
        metrics.update(getattr(cb, "final_metrics", {}) or {})
    metrics["global_step"] = float(trainer.global_step)
    return metrics


@rank_zero_only
def write_metrics(metrics: dict[str, float], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, path)
    print(f"metrics written to {path}")


def _overridden(group: str, exact: tuple[str, ...] | None = None) -> bool:
    """Whether the command line names `group` (`tokenizer=...` or `tokenizer.path=...`); with
    `exact`, only those keys count (`tokenizer.lowercase=false` does not name a tokenizer)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    keys = [o.lstrip("+~").split("=")[0] for o in HydraConfig.get().overrides.task]
    return any(k in exact if exact else k.split(".")[0] == group for k in keys)


def _select(cfg: DictConfig, key: str) -> Any:
    """`cfg.<key>`, or None when it is missing or interpolates what is not there (e.g. the
    demo tokenizer's `${data.demo.root}` under `data=webdataset`)."""
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve
        return None


def _needs_demo(cfg: DictConfig, ckpt) -> bool:
    """Whether evaluating needs the embedded demo: an eval set under its root, or the
    checkpoint's tokenizer is the demo's and is not on disk (built with the demo)."""
    root = _select(cfg, "data.demo.root")
    if not root:
        return False
    root = os.path.abspath(os.path.expanduser(str(root)))
    inside = lambda p: bool(p) and os.path.abspath(os.path.expanduser(str(p))).startswith(root + os.sep)
    recorded = (ckpt.meta.tokenizer or {}).get("path")
    return any(inside(s) for s in (cfg.eval.sets or [])) or (inside(recorded) and not os.path.exists(recorded))


def _checkpoint_demo(ckpt) -> tuple[int, int] | None:
    """(num_train, seed) of the demo a checkpoint was trained on, from the path of its recorded
    tokenizer (`<cache>/demo-n<N>-s<seed>/tokenizer/...`); None for any other tokenizer."""
    import re

    recorded = (ckpt.meta.tokenizer or {}).get("path")
    match = re.fullmatch(r"demo-n(\d+)-s(\d+)", Path(recorded).parent.parent.name) if recorded else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _match_checkpoint_data(cfg: DictConfig, ckpt) -> None:
    """eval.py takes the data kind from the checkpoint unless the command line names it: a
    checkpoint of the demo of N samples is evaluated on that demo's sets (the eval sets are the
    same for every N; the 20k demo was built for a debug checkpoint), and a checkpoint of your
    own data is not evaluated on the demo's sets unless asked (`eval=demo`)."""
    demo = _checkpoint_demo(ckpt)
    if demo and cfg.data.get("demo") and not _overridden("data"):
        if (int(cfg.data.demo.num_train), int(cfg.data.demo.seed)) != demo:
            log.info(
                "the checkpoint was trained on the demo of %d samples (seed %d): using its tokenizer and "
                "eval sets (data.demo.num_train=... to choose another)",
                *demo,
            )
            cfg.data.demo.num_train, cfg.data.demo.seed = demo
    elif (
        demo is None
        and (ckpt.meta.tokenizer or {}).get("path")
        and not _overridden("eval")
        and _select(cfg, "data.demo.root")
        and cfg.eval.sets
    ):
        root = os.path.abspath(os.path.expanduser(str(_select(cfg, "data.demo.root"))))
        sets = [cfg.eval.sets] if isinstance(cfg.eval.sets, str) else cfg.eval.sets
        if all(os.path.abspath(str(s)).startswith(root + os.sep) for s in sets):
            raise ValueError(
                f"checkpoint {cfg.ckpt_path} was trained on your own data (tokenizer "
                f"{ckpt.meta.tokenizer['path']}), and the eval sets are the demo's: name yours with "
                "eval.sets='[/path/to/set.yaml]' (or eval=demo to evaluate it on the demo anyway)"
            )


def _hf_folder_tokenizer(folder: str) -> str:
    """The tokenizer of a transformers folder (`ckpt_path=hf:<folder>`): the folder itself when it
    holds one (a released download's Gemma tokenizer, our export's), else a clear error."""
    if any(
        (Path(folder) / name).exists()
        for name in ("tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer_config.json")
    ):
        return folder
    raise ValueError(
        f"ckpt_path=hf:{folder}: the folder holds no tokenizer; name the one the model was trained "
        "with: tokenizer.path=<.model file or folder>"
    )


def _folder_lowercases(folder: str) -> bool:
    """Whether a transformers folder's tokenizer lower-cases (a Lowercase normalizer in its
    tokenizer.json, as our export writes for a lower-cased run; without one, tokenizer_config's
    `do_lower_case`, SigLIP v1's `SiglipTokenizer` lower-casing by default); a released Gemma
    tokenizer does not, and transformers' processor then sends prompts as written: so does eval.py."""
    import json

    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        return '"Lowercase"' in json.dumps(json.loads(path.read_text()).get("normalizer"))
    config = Path(folder) / "tokenizer_config.json"  # a slow tokenizer only (SigLIP v1's SiglipTokenizer)
    spec = json.loads(config.read_text()) if config.is_file() else {}
    return bool(spec.get("do_lower_case", spec.get("tokenizer_class") == "SiglipTokenizer"))


def _folder_max_patches(folder: str) -> int | None:
    """`max_num_patches` of a NaFlex folder's `Siglip2ImageProcessor` config, else None."""
    import json

    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("max_num_patches")
    return int(value) if value else None


def _plain(value):
    """A DictConfig (or None) as plain Python containers."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from stages.quiet import quiet_known_noise

    quiet_known_noise()
    from siglip2.checkpoint import read_checkpoint, split_spec
    from siglip2.data.tokenizer import build_tokenizer, resolve_checkpoint_tokenizer
    from siglip2.eval.suite import evaluate_all, load_eval_set

    ckpt = read_checkpoint(str(cfg.ckpt_path))
    resolve_eval_seq_len(cfg)  # eval.py composes no stage: auto is square, unless the folder is NaFlex
    _match_checkpoint_data(cfg, ckpt)
    if isinstance(cfg.eval.sets, str):  # eval.sets=/a.yaml without brackets: one set, not its characters
        cfg.eval.sets = [cfg.eval.sets]
    if _needs_demo(cfg, ckpt):  # built only when its sets or its tokenizer are used
        from siglip2.data.demo import ensure_demo

        ensure_demo(
            cfg.data.demo.root,
            num_train=int(cfg.data.demo.num_train),
            seed=int(cfg.data.demo.seed),
            **({"word_share": float(cfg.data.demo.word_share)} if "word_share" in cfg.data.demo else {}),
        )
    if not cfg.eval.sets:
        raise ValueError(
            "nothing to evaluate: eval.sets is empty; name your sets with "
            "eval.sets='[/path/to/set.yaml]' (docs/eval_data.md)"
        )
    model = ckpt.model(str(cfg.get("which", "student"))).to(cfg.device)
    decoder = ckpt.locca_decoder()
    decoder = decoder.to(cfg.device) if decoder is not None else None
    configured = _select(cfg, "tokenizer.path")
    lowercase = bool((ckpt.meta.tokenizer or {}).get("lowercase", cfg.tokenizer.lowercase))
    named = _overridden("tokenizer", exact=("tokenizer", "tokenizer.path"))  # not tokenizer.lowercase alone
    if ckpt.stage == "hf" and not named:  # a transformers folder: its own tokenizer, cased as it is
        path = _hf_folder_tokenizer(split_spec(cfg.ckpt_path)[1])
        if not _overridden("tokenizer", exact=("tokenizer", "tokenizer.lowercase")):
            lowercase = _folder_lowercases(path)
    else:
        path = resolve_checkpoint_tokenizer(
            ckpt.meta.tokenizer,
            str(configured) if configured else None,
            explicit=named,
            what=f"checkpoint {cfg.ckpt_path}",
        )
    log.info("tokenizer: %s (lower-casing %s)", path, "on" if lowercase else "off")
    tokenizer = build_tokenizer(path, length=int(ckpt.model_config.text.max_len), lowercase=lowercase)
    if ckpt.stage == "hf" and cfg.eval.get("naflex_seq_len") is None:
        seq_len = _folder_max_patches(split_spec(cfg.ckpt_path)[1])
        if seq_len:  # a NaFlex folder: evaluated as its processor sees images, not as squares
            log.info(
                "ckpt_path=%s: a NaFlex folder, evaluated at its processor's max_num_patches=%d "
                "(eval.naflex_seq_len=... for another length)",
                cfg.ckpt_path,
                seq_len,
            )
            with open_dict(cfg):
                cfg.eval.naflex_seq_len = seq_len
    results = evaluate_all(
        list(cfg.eval.sets),
        model=model,
        tokenizer=tokenizer,
        image_size=ckpt.image_size,
        device=cfg.device,
        batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.eval.num_workers),
        max_batches=cfg.eval.get("max_batches"),
        decoder=decoder,
        naflex_seq_len=cfg.eval.get("naflex_seq_len"),
        aspect_min=cfg.eval.get("aspect_min"),
        refexp_probe=_plain(cfg.eval.get("refexp_probe")),
    )
    results.pop("_tables", None)
    results.pop("_examples", None)
    metrics = {k: float(v) for k, v in results.items()}
    width = max((len(k) for k in metrics), default=10)
    print(f"{'metric':<{width}}  value")
    for key in sorted(metrics):
        print(f"{key:<{width}}  {metrics[key]:.4f}")
    write_metrics(metrics, Path(cfg.paths.output_dir) / "metrics.json")
    if cfg.get("grid"):
        from siglip2.eval.grid import render_predictions

        zeroshot = next((s for s in cfg.eval.sets if load_eval_set(str(s)).task == "zeroshot"), None)
        if zeroshot is None:
            raise ValueError("grid= needs a zeroshot set in eval.sets")
        if cfg.eval.get("naflex_seq_len"):  # NaFlex: the images at their own aspect, per length
            from siglip2.eval.naflex_grid import render_naflex_predictions

            lengths = list(cfg.eval.get("grid_seq_lens") or [cfg.eval.naflex_seq_len])
            png = render_naflex_predictions(
                str(zeroshot),
                model,
                tokenizer,
                ckpt.model_config.vision.patch_size,
                lengths,
                str(cfg.grid),
                aspect_min=cfg.eval.get("aspect_min"),
                device=cfg.device,
            )
        else:
            png = render_predictions(str(zeroshot), model, decoder, tokenizer, ckpt.image_size, str(cfg.grid))
        print(f"prediction grid written to {png}")
    return metrics
