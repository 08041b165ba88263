"""The recipe's clock: progress in examples seen -> lr factor, losses on/off, EMA momentum.

SigLIP 2 is one run seen through several stages [P §2]: self-distillation and masked
prediction join at 80% of pretraining, resolution adaptation continues the 95% checkpoint,
NaFlex the 90% one with the last 10% of the cosine stretched 3.75x (RECIPE.md). All of them
read one clock, *recipe progress* in [0, 1]:

    progress = (window_start * total_examples + stage_examples_seen / stretch) / total_examples

counted in examples, not steps, so a NaFlex step at half batch advances it by half a step.
A stage declares its window of the recipe (pretrain 0-1, resadapt 0.95-1, NaFlex 0.90-1 with
stretch 3.75); `init_from` therefore starts a stage where its window starts, never with a
fresh warmup.

Everything here is a pure function of the examples seen. Arithmetic is done on whole
examples, so a run at a constant batch b gets bit for bit the factors of the step-based
rule it replaces (warmup `(s + 1) / W`, cosine over `(s - W) / (T - W)`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass


log = logging.getLogger(__name__)


@dataclass
class LossTiming:
    """When a loss is on and how much it counts; every loss config starts with these.

    `start_frac` / `end_frac` are fractions of the *recipe* (0.8 = from 80% of pretraining),
    `weight` multiplies the loss in the stage's total.
    """

    weight: float = 1.0
    start_frac: float = 0.0
    end_frac: float = 1.0

    def __post_init__(self):
        if not 0.0 <= float(self.start_frac) <= float(self.end_frac) <= 1.0:
            raise ValueError(f"need 0 <= start_frac <= end_frac <= 1, got {self.start_frac}, {self.end_frac}")

    @property
    def effective_weight(self) -> float:
        """The weight the stage multiplies the loss by (a loss may scale `weight`, e.g. by model size)."""
        return float(self.weight)


@dataclass
class ClockWindow:
    """A stage's place on the recipe's clock (`stage.clock`; was `stage.recipe`): `window` in
    recipe progress, `stretch` = stage examples per recipe example, `examples` = the recipe's
    length in examples (None: from the checkpoint `init_from` names, else from this stage's
    max_steps). `fit_window`: the stage trains exactly the steps its window holds
    (`trainer.max_steps` is replaced by ceil(window examples x stretch / global batch)) when the
    recipe's length is known (from `examples` or the `init_from` checkpoint). `lr`,
    `rewarm_warmup`, `rewarm_peak`: the stage's lr over its window (`RecipeClock`: "recipe", the
    paper's, or "rewarm", a fresh warmup + cosine over the stage, not the paper's)."""

    window: tuple[float, float] = (0.0, 1.0)
    stretch: float = 1.0
    examples: int | None = None
    fit_window: bool = False
    lr: str = "recipe"
    rewarm_warmup: float = 0.1
    rewarm_peak: float = 1.0

    def __post_init__(self):
        """Every value checked when the stage is built, each error naming its `stage.clock.*` key."""
        window = tuple(self.window) if isinstance(self.window, (list, tuple)) else None
        if (
            window is None
            or len(window) != 2
            or not all(isinstance(v, (int, float)) for v in window)
            or not 0.0 <= window[0] < window[1] <= 1.0
        ):
            raise ValueError(
                f"stage.clock.window must be [start, end] in recipe progress with "
                f"0 <= start < end <= 1, got {self.window!r}"
            )
        self.window = (float(window[0]), float(window[1]))
        if not self.stretch > 0:
            raise ValueError(f"stage.clock.stretch must be > 0, got {self.stretch!r}")
        if self.examples is not None and not int(self.examples) > 0:
            raise ValueError(f"stage.clock.examples must be > 0 (or null), got {self.examples!r}")
        if self.lr not in ("recipe", "rewarm"):
            raise ValueError(f"stage.clock.lr must be 'recipe' (the paper's) or 'rewarm', got {self.lr!r}")
        if not 0.0 <= self.rewarm_warmup < 1.0:
            raise ValueError(f"stage.clock.rewarm_warmup must lie in [0, 1), got {self.rewarm_warmup!r}")
        if not self.rewarm_peak > 0:
            raise ValueError(f"stage.clock.rewarm_peak must be > 0, got {self.rewarm_peak!r}")

    def clock(
        self, stage_steps: int, step_examples: int, warmup: float | int, min_lr_ratio: float, total_examples: int | None
    ) -> "RecipeClock":
        """This window's `RecipeClock` for a stage of `stage_steps` optimiser steps of
        `step_examples` examples (all ranks, accumulation included), with the optimiser's
        `warmup` and `min_lr_ratio`; `total_examples` = the recipe's length (None: from this
        stage's own steps)."""
        return RecipeClock.for_stage(
            stage_steps=int(stage_steps),
            step_examples=int(step_examples),
            warmup=warmup,
            window=tuple(self.window),
            stretch=self.stretch,
            min_lr_ratio=min_lr_ratio,
            total_examples=int(total_examples) if total_examples else None,
            lr=self.lr,
            rewarm_warmup=self.rewarm_warmup,
            rewarm_peak=self.rewarm_peak,
        )

    @staticmethod
    def warn_if_unfit(clock: "RecipeClock", planned_examples: float, step_examples: int) -> None:
        """A warning when the stage will train more or fewer examples than its window holds
        (more than one step's worth): the schedule then stops early or ends unfinished."""
        if abs(planned_examples - clock.stage_examples) > step_examples:
            log.warning(
                "this stage trains %d examples but its window %s of a %d-example recipe holds %.0f: the "
                "schedule will %s",
                planned_examples,
                clock.window,
                clock.total_examples,
                clock.stage_examples,
                "stop at the window's end early" if planned_examples > clock.stage_examples else "end unfinished",
            )

    def steps(self, total_examples: int | None, global_batch: int) -> int | None:
        """Optimiser steps of `global_batch` examples that cover the window (the last one may
        overrun the window's end, where the clock stops), or None while the recipe's length
        `total_examples` is unknown."""
        if not total_examples:
            return None
        start, end = self.window
        return max(1, math.ceil((end - start) * int(total_examples) * self.stretch / int(global_batch)))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps (step s uses (s + 1) / warmup), then cosine
    decay to `min_ratio` at `total` steps. The step-based closed form of `RecipeClock.lr_factor`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RecipeClock:
    """One stage's view of the recipe's clock.

    total_examples: examples of the whole recipe (pretraining 0-100%).
    step_examples: examples of one nominal optimiser step of this stage (global batch x
        gradient accumulation); only the warmup's "this step's share" uses it.
    warmup_examples: recipe examples at which the linear warmup reaches 1.
    window: (start, end) of this stage in recipe progress.
    stretch: stage examples per recipe example inside the window (NaFlex 3.75, else 1).
    min_lr_ratio: the cosine ends at min_lr_ratio x peak.
    lr: "recipe" (the paper: the stage reads its window's part of the one recipe cosine, so
        a continuation from 90% runs at the cosine's tail, ~2% of peak) or "rewarm" (not the
        paper's: the stage's own linear warmup over `rewarm_warmup` of its examples to
        `rewarm_peak` x peak, then a cosine to min_lr_ratio x that over the rest of the
        stage; for adapting a model to what it has not seen, e.g. native aspect ratios).
        Loss switches and the EMA momentum follow recipe progress either way.
    """

    total_examples: int
    step_examples: int
    warmup_examples: int = 0
    window: tuple[float, float] = (0.0, 1.0)
    stretch: float = 1.0
    min_lr_ratio: float = 0.0
    lr: str = "recipe"
    rewarm_warmup: float = 0.1
    rewarm_peak: float = 1.0

    def __post_init__(self):
        start, end = self.window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"a stage's window must satisfy 0 <= start < end <= 1, got {self.window}")
        if self.total_examples <= 0 or self.step_examples <= 0:
            raise ValueError(
                f"total_examples and step_examples must be > 0, got {self.total_examples}, {self.step_examples}"
            )
        if self.stretch <= 0:
            raise ValueError(f"stretch must be > 0, got {self.stretch}")
        if self.lr not in ("recipe", "rewarm"):
            raise ValueError(f"lr must be 'recipe' or 'rewarm', got {self.lr!r}")
        if not 0.0 <= self.rewarm_warmup < 1.0 or self.rewarm_peak <= 0:
            raise ValueError(
                f"rewarm_warmup must lie in [0, 1) and rewarm_peak be > 0, got {self.rewarm_warmup}, {self.rewarm_peak}"
            )

    @classmethod
    def for_stage(
        cls,
        *,
        stage_steps: int,
        step_examples: int,
        warmup: float | int = 0,
        window: tuple[float, float] = (0.0, 1.0),
        stretch: float = 1.0,
        min_lr_ratio: float = 0.0,
        total_examples: int | None = None,
        lr: str = "recipe",
        rewarm_warmup: float = 0.1,
        rewarm_peak: float = 1.0,
    ) -> "RecipeClock":
        """The clock of a stage that runs `stage_steps` optimiser steps of `step_examples`.

        Without `total_examples` (the recipe's length, e.g. from the checkpoint a stage starts
        from) the stage's own length defines it: total = steps x step_examples / (span x
        stretch). `warmup`: optimiser steps (int), or a fraction of the recipe (float < 1),
        rounded to whole steps as the step-based schedule did.
        """
        start, end = window
        if total_examples is None:
            total_examples = int(round(stage_steps * step_examples / ((end - start) * stretch)))
        total_steps = total_examples / step_examples
        if isinstance(warmup, float) and warmup < 1:
            warmup_examples = int(round(warmup * total_steps)) * step_examples
        else:
            warmup_examples = int(warmup) * step_examples
        return cls(
            total_examples=int(total_examples),
            step_examples=int(step_examples),
            warmup_examples=warmup_examples,
            window=(float(start), float(end)),
            stretch=float(stretch),
            min_lr_ratio=float(min_lr_ratio),
            lr=str(lr),
            rewarm_warmup=float(rewarm_warmup),
            rewarm_peak=float(rewarm_peak),
        )

    # ---- progress --------------------------------------------------------------------
    def recipe_examples(self, stage_examples: float) -> float:
        """Recipe examples reached after `stage_examples` examples of this stage (capped at
        the window's end)."""
        start = round(self.window[0] * self.total_examples)
        seen = stage_examples if self.stretch == 1.0 else stage_examples / self.stretch
        return min(start + seen, self.window[1] * self.total_examples)

    def progress(self, stage_examples: float) -> float:
        """Recipe progress in [window start, window end] after `stage_examples` of this stage."""
        return self.recipe_examples(stage_examples) / self.total_examples

    @property
    def stage_examples(self) -> float:
        """Examples this stage takes to cover its window."""
        return (self.window[1] - self.window[0]) * self.total_examples * self.stretch

    # ---- what the clock decides ------------------------------------------------------
    def lr_factor(self, stage_examples: float) -> float:
        """Multiplier of the peak lr for the step that starts after `stage_examples`.

        Warmup: (examples reached at the end of this step) / warmup_examples; then cosine
        from 1 at the end of warmup to `min_lr_ratio` at the end of the recipe. With
        `lr="rewarm"`, the same shape over this stage's own examples, peaking at `rewarm_peak`.
        """
        if self.lr == "rewarm":
            return self._rewarm_factor(stage_examples)
        r = self.recipe_examples(stage_examples)
        w, total = self.warmup_examples, self.total_examples
        if w > 0 and r < w:
            step = self.step_examples if self.stretch == 1.0 else self.step_examples / self.stretch
            return (r + step) / w
        t = min(1.0, (r - w) / max(self.step_examples, total - w))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def _rewarm_factor(self, stage_examples: float) -> float:
        span = self.stage_examples
        w = self.rewarm_warmup * span
        if w > 0 and stage_examples < w:
            return self.rewarm_peak * min(1.0, (stage_examples + self.step_examples) / w)
        t = min(1.0, (stage_examples - w) / max(self.step_examples, span - w))
        cosine = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.rewarm_peak * cosine

    @staticmethod
    def loss_on(timing: LossTiming, progress: float) -> bool:
        """Whether a loss with this timing is on at `progress`."""
        return float(timing.start_frac) <= progress and (progress < float(timing.end_frac) or timing.end_frac >= 1.0)

    @classmethod
    def loss_weight(cls, timing: LossTiming, progress: float) -> float:
        """The loss's weight at `progress` (0 while it is off)."""
        return timing.effective_weight if cls.loss_on(timing, progress) else 0.0


def ema_momentum(
    progress: float, base: float = 0.996, final: float | None = None, start: float = 0.0, end: float = 1.0
) -> float:
    """EMA teacher momentum at recipe `progress`.

    Fixed `base` by default (0.996, RECIPE.md: not published for SigLIP 2). With `final`
    (DINO's schedule, final 1.0) it rises on a half cosine from `base` at `start` to `final`
    at `end`: m = final - (final - base) * (1 + cos(pi * t)) / 2, t = (progress - start) / (end - start).
    """
    if final is None:
        return float(base)
    t = min(1.0, max(0.0, (progress - start) / max(end - start, 1e-12)))
    return float(final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * t)))
