"""The recipe's clock (siglip2/schedule.py) and the typed configs every stage reads."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from siglip2.config import from_dict
from siglip2.losses.distill import LocalToGlobalConfig, MaskedPredictionConfig
from siglip2.losses.locca import LoccaConfig
from siglip2.losses.sigmoid import SigmoidLossConfig
from siglip2.optim import OptimConfig
from siglip2.schedule import LossTiming, RecipeClock, ema_momentum, warmup_cosine
from stages.pretrain import EMAConfig

ROOT = Path(__file__).resolve().parents[2]


def test_constant_batch_clock_gives_the_step_schedule_bit_for_bit():
    """A constant-batch run must get exactly the factors of the step-based schedule it
    replaced (same numbers before and after the clock moved to examples)."""
    for steps, batch, warm in [(750, 32, 0.05), (6, 16, 0.05), (100, 7, 10), (1000, 1024, 0)]:
        clock = RecipeClock.for_stage(stage_steps=steps, step_examples=batch, warmup=warm)
        w = int(round(warm * steps)) if isinstance(warm, float) else warm
        for s in range(steps + 1):
            assert clock.lr_factor(s * batch) == warmup_cosine(s, steps, w, 0.0), (steps, batch, s)
            assert clock.progress(s * batch) == s / steps


def test_warmup_and_cosine_closed_form():
    clock = RecipeClock.for_stage(stage_steps=100, step_examples=10, warmup=10, min_lr_ratio=0.1)
    assert clock.lr_factor(0) == pytest.approx(0.1)  # first step: 1 / warmup steps
    assert clock.lr_factor(90) == pytest.approx(1.0)  # last warmup step
    assert clock.lr_factor(550) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert clock.lr_factor(1000) == pytest.approx(0.1)  # floor at min_lr_ratio


def test_half_batches_advance_the_clock_half_as_far():
    clock = RecipeClock.for_stage(stage_steps=100, step_examples=64, warmup=0)
    assert clock.progress(50 * 64) == 0.5
    assert clock.progress(50 * 64 + 32) == pytest.approx(0.5 + 0.5 / 100)
    assert clock.lr_factor(50 * 64 + 32) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.505)))


def test_stage_windows_continue_the_recipe_not_a_fresh_warmup():
    total = 10_000 * 256
    pre = RecipeClock.for_stage(stage_steps=10_000, step_examples=256, warmup=0.05)
    # resolution adaptation: 95-100% of the same recipe
    res = RecipeClock.for_stage(
        stage_steps=500, step_examples=256, warmup=0.05, window=(0.95, 1.0), total_examples=total
    )
    assert res.progress(0) == pytest.approx(0.95)
    assert res.lr_factor(0) == pytest.approx(pre.lr_factor(int(0.95 * total)))  # no warmup at the start
    assert res.progress(500 * 256) == pytest.approx(1.0)
    assert res.stage_examples == pytest.approx(500 * 256)
    # NaFlex: 90-100%, stretched 3.75x: 3.75 times the examples for the same stretch of cosine
    nf = RecipeClock.for_stage(
        stage_steps=3750, step_examples=256, warmup=0.05, window=(0.9, 1.0), stretch=3.75, total_examples=total
    )
    assert nf.stage_examples == pytest.approx(0.1 * total * 3.75)
    assert nf.progress(1875 * 256) == pytest.approx(0.95)
    assert nf.lr_factor(1875 * 256) == pytest.approx(pre.lr_factor(int(0.95 * total)))
    assert nf.progress(10 * nf.stage_examples) == 1.0  # capped at the window's end
    # without the recipe's length the stage's own defines it
    alone = RecipeClock.for_stage(stage_steps=500, step_examples=256, window=(0.95, 1.0))
    assert alone.total_examples == total


def test_rewarm_gives_the_stage_its_own_warmup_and_cosine_on_the_recipe_clock():
    total = 10_000 * 256
    recipe = RecipeClock.for_stage(
        stage_steps=3750, step_examples=256, warmup=0.05, window=(0.9, 1.0), stretch=3.75, total_examples=total
    )
    rewarm = RecipeClock.for_stage(
        stage_steps=3750,
        step_examples=256,
        warmup=0.05,
        window=(0.9, 1.0),
        stretch=3.75,
        total_examples=total,
        lr="rewarm",
        rewarm_warmup=0.1,
        rewarm_peak=0.5,
        min_lr_ratio=0.1,
    )
    span = rewarm.stage_examples
    assert recipe.lr_factor(0) < 0.03  # the paper's: the cosine's tail
    assert rewarm.lr_factor(0) == pytest.approx(0.5 * 256 / (0.1 * span))  # first step of a fresh warmup
    assert rewarm.lr_factor(0.1 * span - 256) == pytest.approx(0.5)  # warmup ends at the peak
    assert rewarm.lr_factor(0.55 * span) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))  # half the cosine
    assert rewarm.lr_factor(span) == pytest.approx(0.05)  # min_lr_ratio x peak
    # progress (loss switches, EMA momentum) is the recipe's either way
    assert rewarm.progress(span / 2) == recipe.progress(span / 2) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="lr must be"):
        RecipeClock.for_stage(stage_steps=10, step_examples=4, lr="warm")


def test_losses_switch_on_at_their_fraction():
    late = LossTiming(weight=2.0, start_frac=0.8)
    clock = RecipeClock.for_stage(stage_steps=10, step_examples=4)
    on = [RecipeClock.loss_on(late, clock.progress(s * 4)) for s in range(10)]
    assert on == [False] * 8 + [True] * 2
    assert RecipeClock.loss_weight(late, 0.5) == 0.0 and RecipeClock.loss_weight(late, 0.9) == 2.0
    window = LossTiming(start_frac=0.2, end_frac=0.5)
    assert [RecipeClock.loss_on(window, p) for p in (0.1, 0.2, 0.49, 0.5, 1.0)] == [False, True, True, False, False]
    with pytest.raises(ValueError, match="start_frac"):
        LossTiming(start_frac=1.2)


def test_ema_momentum_fixed_and_dino_cosine():
    assert ema_momentum(0.3) == 0.996
    # DINO: m = 1 - (1 - base) * (cos(pi t) + 1) / 2
    for t in (0.0, 0.25, 0.5, 1.0):
        assert ema_momentum(0.8 + 0.2 * t, base=0.996, final=1.0, start=0.8, end=1.0) == pytest.approx(
            1 - (1 - 0.996) * (math.cos(math.pi * t) + 1) / 2
        )


# ---------------------------------------------------------------- typed configs
def test_a_misspelt_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"stage\.losses\.locca\.parralel_prob.*did you mean.*parallel_prob"):
        from_dict(LoccaConfig, {"parralel_prob": 0.5}, "stage.losses.locca")
    with pytest.raises(ValueError, match=r"stage\.losses\.locca\.targets\.binz"):
        from_dict(LoccaConfig, {"targets": {"binz": 10}}, "stage.losses.locca")
    with pytest.raises(ValueError, match=r"optim\.warmup"):
        from_dict(OptimConfig, {"warmup": 10}, "optim")
    with pytest.raises(ValueError, match=r"moved to 'stage\.views\.mask_ratio'"):
        from_dict(MaskedPredictionConfig, {"mask_ratio": 0.3}, "stage.losses.masked")
    cfg = from_dict(LoccaConfig, {"targets": {"bins": 10}, "start_frac": 0.0})
    assert cfg.targets.bins == 10 and cfg.depth_ratio == 0.5


def test_a_stage_refuses_unknown_losses_and_keys_before_building():
    from stages.pretrain import PretrainStage

    model = {
        "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=2, image_size=8),
        "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=10, max_len=4),
    }
    with pytest.raises(ValueError, match=r"unknown loss \['sigmod'\]"):
        PretrainStage(model=model, optim={}, losses={"sigmod": {}})
    with pytest.raises(ValueError, match=r"stage\.losses\.sigmoid\.chunksize"):
        PretrainStage(model=model, optim={}, losses={"sigmoid": {"chunksize": 8}})
    with pytest.raises(ValueError, match=r"optim\.beta\b"):
        PretrainStage(model=model, optim={"beta": [0.9, 0.9]}, losses={"sigmoid": {}})


def _literal_values(node, prefix=""):
    """Leaves of a yaml node that are written out (not `${...}` interpolations)."""
    out = {}
    for key in node:
        value = node._get_node(key)
        if OmegaConf.is_dict(value):
            out.update(_literal_values(value, f"{prefix}{key}."))
        elif not OmegaConf.is_interpolation(node, key) and key != "_target_":
            out[f"{prefix}{key}"] = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value._value()
    return out


def _defaults(obj, prefix=""):
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_defaults(value, f"{prefix}{f.name}."))
        elif isinstance(value, dict):
            out.update({f"{prefix}{f.name}.{k}": v for k, v in value.items()})
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


@pytest.mark.parametrize(
    "yaml_path,key,cls",
    [
        ("conf/train.yaml", "optim", OptimConfig),
        ("conf/stage/pretrain.yaml", "losses.sigmoid", SigmoidLossConfig),
        ("conf/stage/pretrain.yaml", "losses.locca", LoccaConfig),
        ("conf/stage/pretrain.yaml", "losses.local_to_global", LocalToGlobalConfig),
        ("conf/stage/pretrain.yaml", "losses.masked", MaskedPredictionConfig),
        ("conf/stage/pretrain.yaml", "ema", EMAConfig),
    ],
)
def test_code_defaults_are_the_yaml_defaults(yaml_path, key, cls):
    node = OmegaConf.select(OmegaConf.load(ROOT / yaml_path), key)
    written = _literal_values(node)
    defaults = _defaults(cls())
    assert set(written) <= set(defaults), (
        f"{yaml_path}:{key} has keys the code does not: {set(written) - set(defaults)}"
    )
    differ = {k: (v, defaults[k]) for k, v in written.items() if v != defaults[k]}
    assert not differ, f"{yaml_path}:{key} (yaml, code) disagree: {differ}"
