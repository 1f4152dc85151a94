"""Schedules over optimizer steps t = number of completed steps (t = 0 is before training).

A sparsity schedule says when pruning events happen (`is_event`) and the value they prune to
(`value_at`: a sparsity, or for threshold criteria a threshold). LR schedules give a multiplier.
"""
from __future__ import annotations

import dataclasses

from .registry import SCHEDULES


@SCHEDULES.register("one-shot")
@dataclasses.dataclass
class OneShot:
    """Prune once to `final` at step `at` (0: before training), then hold."""
    final: float
    at: int = 0

    def is_event(self, t: int) -> bool:
        return t == self.at

    def value_at(self, t: int) -> float:
        return self.final if t >= self.at else 0.0

    @property
    def end(self) -> int:
        return self.at


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
        return self.begin <= t <= self.end and ((t - self.begin) % self.frequency == 0 or t == self.end)

    def value_at(self, t: int) -> float:
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


@SCHEDULES.register("sanh")
@dataclasses.dataclass
class SanhThreshold:
    """Sanh et al. (2020) movement schedule: `initial` during the warm-up, cubic to `final` until
    `total - cooldown`, then `final` during the cool-down. Events every `frequency` steps through the
    end of training: movement masks keep following the scores, at constant sparsity in the cool-down."""
    initial: float
    final: float
    total: int
    warmup: int
    cooldown: int
    frequency: int = 1

    def is_event(self, t: int) -> bool:
        return t % self.frequency == 0 or t == self.total

    def value_at(self, t: int) -> float:
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
    def over(cls, initial: float, final: float, total_steps: int, warmup_frac: float, cooldown_frac: float, frequency: int = 1):
        return cls(initial, final, total_steps, int(warmup_frac * total_steps), int(cooldown_frac * total_steps), frequency)


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@SCHEDULES.register("lr-rewind")
@dataclasses.dataclass
class LRRewind:
    """Prune Once For All's learning-rate rewinding (Renda et al. 2020): linear warm-up/decay while
    pruning (steps [0, rewind_at)), then the LR jumps back to its base value and decays linearly to 0
    over the remaining steps, so the final sparse network gets a full LR cycle."""
    total: int
    rewind_at: int
    warmup: int

    def multiplier(self, step: int) -> float:
        if self.rewind_at <= 0 or self.rewind_at >= self.total or step < self.rewind_at:
            end = self.rewind_at if 0 < self.rewind_at < self.total else self.total
            return linear_warmup_decay(step, end, self.warmup)
        return max(0.0, (self.total - step) / (self.total - self.rewind_at))
