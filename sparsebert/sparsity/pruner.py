"""The pruner: criterion + pattern + schedule over a set of MaskedLinear modules."""
from __future__ import annotations

import torch

from .. import ops
from .criteria import CRITERIA, Importance
from .modules import MaskedLinear
from .patterns import PATTERNS
from .schedules import Lock, Schedule


class Pruner:
    """Applies pruning events. Masks are written in place (optimizers hold them by reference).

    After an event, pruned weights are set to 0 and the module promises weight_is_masked (magnitude
    pruning, lock), unless the criterion learns scores: movement keeps pruned weights so their scores
    can still move (Sanh et al.); their products are masked out, and `finalize()` zeroes them at the end
    (`zero_weights` overrides the criterion's choice). `num_heads` (the model's attention heads) is
    given to every pattern; the structured one needs it.
    """

    def __init__(self, modules: dict[str, MaskedLinear], criterion: str, pattern: str, schedule: Schedule | None, *,
                 pattern_kwargs: dict | None = None, num_heads: int | None = None, zero_weights: bool | None = None):
        if not modules:
            raise ValueError("Pruner needs at least one MaskedLinear module")
        self.names = list(modules)
        self.modules = list(modules.values())
        self.criterion_name, self.pattern_name = criterion, pattern
        self.criterion = CRITERIA.get(criterion)
        self.pattern = PATTERNS.get(pattern)
        self.schedule = schedule
        self.pattern_kwargs = dict(pattern_kwargs or {})
        if num_heads is not None:
            self.pattern_kwargs.setdefault("num_heads", num_heads)
        self.zero_weights = not self.criterion.learns_scores if zero_weights is None else zero_weights
        self.last_event = -1
        self.events = 0
        self.sparsity = 0.0
        self.finalized = False

    @property
    def numel(self) -> int:
        return sum(m.weight.numel() for m in self.modules)

    def nnz(self) -> int:
        """Kept weights over the pruned modules."""
        return sum(m.nnz() for m in self.modules)

    @property
    def locked(self) -> bool:
        """Whether the masks can no longer change (no event after t = 0)."""
        return self.schedule is None or self.schedule.end <= 0

    def step(self, t: int) -> dict[str, float]:
        """Call with t = completed optimizer steps (0 before training)."""
        if self.schedule is None or not self.schedule.is_event(t):
            return {}
        stats = self.prune(self.schedule.value_at(t))
        self.last_event = t
        return stats

    @torch.no_grad()
    def prune(self, value: float) -> dict[str, float]:
        """One event: value is the target sparsity, or the threshold for threshold criteria."""
        imp: Importance = self.criterion(self.modules)
        if imp.by_threshold:
            masks = [ops.pack_mask((t.abs() if imp.use_abs else t) > value) for t in imp.tensors]
            expected = None
        else:
            masks, expected = self.pattern(imp, value, names=self.names, **self.pattern_kwargs)
        for module, mask in zip(self.modules, masks):
            module.mask.copy_(mask)
            if self.zero_weights:
                self._zero(module)
        nnz = self.nnz()
        if expected is not None and nnz != expected:
            raise RuntimeError(f"pruning event kept {nnz} weights, the {self.pattern_name} pattern promised {expected}")
        self.events += 1
        self.sparsity = 1.0 - nnz / self.numel
        return {"sparsity": self.sparsity, "target": float(value)}

    @staticmethod
    def _zero(module: MaskedLinear) -> None:
        module.weight.data.mul_(module.dense_mask().to(module.weight.dtype))
        module.weight_is_masked = True

    @torch.no_grad()
    def finalize(self) -> None:
        """Zero pruned weights for good and stop training the scores (end of movement pruning)."""
        for module in self.modules:
            self._zero(module)
            if module.scores is not None:
                module.scores.requires_grad_(False)
        self.finalized = True

    def state_dict(self) -> dict:
        """The event bookkeeping, for resume."""
        # Masks and scores live in the model's state_dict; this is the event bookkeeping.
        return {"last_event": self.last_event, "events": self.events, "sparsity": self.sparsity, "finalized": int(self.finalized)}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict() after the model's state (masks) of the same checkpoint."""
        self.last_event, self.events, self.sparsity = int(state["last_event"]), int(state["events"]), float(state["sparsity"])
        if bool(state.get("finalized", 0)):
            self.finalize()
        elif self.zero_weights and self.events:
            for module in self.modules:
                module.weight_is_masked = True


def lock(modules: dict[str, MaskedLinear]) -> Pruner:
    """Pattern lock: mask = (weight != 0), fixed from now on (Prune OFA downstream, one-shot fine-tuning)."""
    pruner = Pruner(modules, Lock.criterion, "global", Lock())
    pruner.step(0)
    return pruner
