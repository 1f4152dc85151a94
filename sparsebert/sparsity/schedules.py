"""Schedules over optimizer steps t = number of completed steps (t = 0 is before training).

A sparsity schedule says when pruning events happen (`is_event`), the value they prune to
(`value_at`: a sparsity, or for threshold criteria a threshold), its `final` value and its last
event (`end`). Each is registered by the name recipes use and built from a method's options by
`from_config(options, total_steps, criterion)`. LR schedules give a multiplier.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

from ..registry import Registry
from .criteria import Criterion

__all__ = ["SCHEDULES", "Cubic", "LRRewind", "Lock", "NoPruning", "OneShot", "SanhThreshold", "Schedule",
           "linear_warmup_decay"]


class Schedule(Protocol):
    """What the pruner needs of a sparsity schedule (every registered schedule has it)."""

    final: float

    @property
    def end(self) -> int:
        """The step of the last event (0: none after the one before training)."""

    def is_event(self, t: int) -> bool:
        """Whether a pruning event happens after `t` completed steps."""

    def value_at(self, t: int) -> float:
        """The sparsity (or threshold) an event at `t` prunes to."""


SCHEDULES: Registry = Registry("schedule")


@SCHEDULES.register("one-shot")
@dataclasses.dataclass
class OneShot:
    """Prune once to `final` at step `at` (0: before training), then hold."""
    final: float
    at: int = 0

    def is_event(self, t: int) -> bool:
        """Whether a pruning event happens after `t` completed steps."""
        return t == self.at

    def value_at(self, t: int) -> float:
        """The sparsity (or threshold) an event at `t` prunes to."""
        return self.final if t >= self.at else 0.0

    @property
    def end(self) -> int:
        return self.at

    @classmethod
    def from_config(cls, c: dict, total_steps: int, criterion: Criterion) -> "OneShot":
        """The schedule from a method's options, for a run of `total_steps` steps."""
        return cls(c["sparsity"], 0)


@SCHEDULES.register("none")
@dataclasses.dataclass
class NoPruning:
    """No pruning event: masks stay as they are (all kept after sparsify)."""
    final: float = 0.0
    end: int = 0

    def is_event(self, t: int) -> bool:
        """Whether a pruning event happens after `t` completed steps."""
        return False

    def value_at(self, t: int) -> float:
        """The sparsity (or threshold) an event at `t` prunes to."""
        return 0.0

    @classmethod
    def from_config(cls, c: dict, total_steps: int, criterion: Criterion) -> "NoPruning":
        """The schedule from a method's options, for a run of `total_steps` steps."""
        return cls()


@SCHEDULES.register("lock")
@dataclasses.dataclass
class Lock(NoPruning):
    """Pattern lock: one event before training keeps exactly the weights that are not zero (the
    `nonzero` criterion, threshold 0), and the mask never changes (Prune OFA downstream)."""
    criterion = "nonzero"  # whatever the method's criterion: the pattern is the weights' own

    def is_event(self, t: int) -> bool:
        """Whether a pruning event happens after `t` completed steps."""
        return t == 0


@SCHEDULES.register("cubic")
@dataclasses.dataclass
class Cubic:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - begin) / (end - begin))^3, with events every
    `frequency` steps on [begin, end] (and at `end`), then held at s_f."""
    initial: float
    final: float
    begin: int
    end: int
    frequency: int

    def __post_init__(self):
        if not 0 <= self.begin <= self.end:
            raise ValueError(f"cubic schedule needs 0 <= begin <= end, got {self.begin}, {self.end}")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {self.frequency}")

    def is_event(self, t: int) -> bool:
        """Whether a pruning event happens after `t` completed steps."""
        return self.begin <= t <= self.end and ((t - self.begin) % self.frequency == 0 or t == self.end)

    def value_at(self, t: int) -> float:
        """The sparsity (or threshold) an event at `t` prunes to."""
        if t < self.begin:
            return 0.0
        if t >= self.end:
            return self.final
        progress = (t - self.begin) / (self.end - self.begin)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    @classmethod
    def over(cls, initial: float, final: float, total_steps: int, begin_frac: float, end_frac: float, events: int) -> "Cubic":
        """From fractions of training and a number of pruning events (as recipes state them)."""
        begin, end = int(begin_frac * total_steps), max(int(begin_frac * total_steps), int(end_frac * total_steps))
        return cls(initial, final, begin, end, max(1, (end - begin) // max(1, events)))

    @classmethod
    def from_config(cls, c: dict, total_steps: int, criterion: Criterion) -> "Cubic":
        """The schedule from a method's options, for a run of `total_steps` steps."""
        return cls.over(c["initial_sparsity"], c["sparsity"], total_steps, c["begin_frac"], c["end_frac"], c["events"])


@SCHEDULES.register("sanh")
@dataclasses.dataclass
class SanhThreshold:
    """Sanh et al. (2020) movement schedule: `initial` during the warm-up, cubic to `final` until
    `total - cooldown`, then `final` during the cool-down. Events every `frequency` steps through the
    end of training: movement masks keep following the scores, at constant sparsity in the cool-down.
    For a threshold criterion (soft movement) the values are thresholds, else sparsities."""
    initial: float
    final: float
    total: int
    warmup: int
    cooldown: int
    frequency: int = 1

    def is_event(self, t: int) -> bool:
        """Whether a pruning event happens after `t` completed steps."""
        return t % self.frequency == 0 or t == self.total

    def value_at(self, t: int) -> float:
        """The sparsity (or threshold) an event at `t` prunes to."""
        if t <= self.warmup:
            return self.initial
        if t > self.total - self.cooldown:
            return self.final
        progress = (t - self.warmup) / max(1, self.total - self.warmup - self.cooldown)
        return self.final + (self.initial - self.final) * (1.0 - min(progress, 1.0)) ** 3

    @property
    def end(self) -> int:
        return self.total

    @classmethod
    def over(cls, initial: float, final: float, total_steps: int, warmup_frac: float, cooldown_frac: float,
             frequency: int = 1) -> "SanhThreshold":
        """From fractions of training (warm-up, cool-down) and the steps between events."""
        return cls(initial, final, total_steps, int(warmup_frac * total_steps), int(cooldown_frac * total_steps), frequency)

    @classmethod
    def from_config(cls, c: dict, total_steps: int, criterion: Criterion) -> "SanhThreshold":
        """The schedule from a method's options, for a run of `total_steps` steps."""
        initial, final = ((c["threshold_initial"], c["threshold_final"]) if criterion.by_threshold
                          else (c["initial_sparsity"], c["sparsity"]))
        return cls.over(initial, final, total_steps, c["warmup_frac"], c["cooldown_frac"], c["frequency"])


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR multiplier: 0 -> 1 over `warmup` steps, then 1 -> 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclasses.dataclass
class LRRewind:
    """Prune Once For All's learning-rate rewinding (Renda et al. 2020): linear warm-up/decay while
    pruning (steps [0, rewind_at)), then the LR jumps back to its base value and decays linearly to 0
    over the remaining steps, so the final sparse network gets a full LR cycle."""
    total: int
    rewind_at: int
    warmup: int

    def multiplier(self, step: int) -> float:
        """The LR multiplier at `step`."""
        if self.rewind_at <= 0 or self.rewind_at >= self.total or step < self.rewind_at:
            end = self.rewind_at if 0 < self.rewind_at < self.total else self.total
            return linear_warmup_decay(step, end, self.warmup)
        return max(0.0, (self.total - step) / (self.total - self.rewind_at))
