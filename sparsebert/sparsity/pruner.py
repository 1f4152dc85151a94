"""The pruner: criterion + pattern + schedule over a set of MaskedLinear modules."""
from __future__ import annotations

import torch

from .. import distributed as D
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
    given to every pattern; the structured one needs it. `check_ranks`: under torch.distributed, check
    after every event that all ranks hold the same masks (see `prune`).

    A criterion with gradient statistics (oBERT's Fisher) gets them from `observe()`, which the training
    optimizer's step calls (a hook `SparseMethod.watch` adds) while `wants_gradients()`: from the first
    step to the last event; `criterion_kwargs` configure them (e.g. {"block": 50, "grads": 128}).
    """

    def __init__(self, modules: dict[str, MaskedLinear], criterion: str, pattern: str, schedule: Schedule | None, *,
                 pattern_kwargs: dict | None = None, num_heads: int | None = None, zero_weights: bool | None = None,
                 check_ranks: bool = True, criterion_kwargs: dict | None = None):
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
        self.check_ranks = check_ranks
        criterion_kwargs = dict(criterion_kwargs or {})
        self.criterion.check_options(criterion, criterion_kwargs)
        self.grad_stats = None
        if self.criterion.stats is not None:
            self.grad_stats = [self.criterion.stats(m, **criterion_kwargs) for m in self.modules]
        self.t = 0
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
        self.t = t
        if self.schedule is None or not self.schedule.is_event(t):
            return {}
        report = self.prune(self.schedule.value_at(t))
        self.last_event = t
        if not self.wants_gradients():
            self.grad_stats = None  # no event left to rank
        return report

    def wants_gradients(self) -> bool:
        """Whether the criterion reads gradient statistics and an event is still to come."""
        return self.grad_stats is not None and self.schedule is not None and self.t < self.schedule.end

    @torch.no_grad()
    def observe(self) -> None:
        """Fold the weights' current gradients into the criterion's statistics (before the optimizer
        step that uses them; a module without a gradient counts as a zero one)."""
        for module, fisher in zip(self.modules, self.grad_stats):
            grad = module.weight.grad
            if D.is_sharded(module.weight):
                raise NotImplementedError(f"criterion {self.criterion_name!r} keeps its gradient statistics per "
                                          "whole weight: it does not run on sharded (FSDP2) weights; use DDP")
            fisher.add(grad if grad is not None else torch.zeros_like(module.weight))

    @torch.no_grad()
    def prune(self, value: float) -> dict[str, float]:
        """One event: value is the target sparsity, or the threshold for threshold criteria.

        Sharded weights (FSDP2 DTensors) are ranked shard by shard, with the thresholds found over
        all shards (see sparsebert.ops.topk_masks), so the masks are those of the whole weights;
        the event reports the bytes its collectives moved (`comm_bytes`) and what gathering the
        ranked scores would have moved instead (`gather_bytes`). Under torch.distributed every rank
        must call it: the masks are checked to agree across ranks (MasksDiffer otherwise)."""
        if self.criterion.stats is not None and self.grad_stats is None:
            raise RuntimeError(f"criterion {self.criterion_name!r}: its gradient statistics were released after the "
                               "schedule's last event; build a new Pruner to prune again")
        imp: Importance = self.criterion(self.modules, self.grad_stats)
        before = [m.dense_mask() for m in self.modules] if self.criterion.update is not None else None
        sharded = any(D.is_sharded(t) for t in imp.tensors)
        with D.comm_log() as comm:
            if imp.by_threshold:
                masks = [self._threshold_mask(t, imp.use_abs, value) for t in imp.tensors]
                expected = None
            else:
                masks, expected = self.pattern(imp, value, names=self.names, **self.pattern_kwargs)
            for module, mask in zip(self.modules, D.full_tensors(masks)):
                module.mask.copy_(mask)
            if before is not None:
                self.criterion.update(self.modules, self.grad_stats, [b & ~m.dense_mask() for b, m in zip(before, self.modules)])
            if self.zero_weights:
                for module in self.modules:
                    self._zero(module)
            if self.check_ranks:
                D.check_same_on_ranks([m.mask for m in self.modules], self.names, self._group(imp.tensors),
                                      f"after pruning to {value:g}")
        nnz = self.nnz()
        if expected is not None and nnz != expected:
            raise RuntimeError(f"pruning event kept {nnz} weights, the {self.pattern_name} pattern promised {expected}")
        self.events += 1
        self.sparsity = 1.0 - nnz / self.numel
        stats = {"sparsity": self.sparsity, "target": float(value)}
        if sharded:
            w = D.world_size(self._group(imp.tensors))
            stats["comm_bytes"] = comm.bytes
            stats["gather_bytes"] = (w - 1) / w * sum(t.numel() * t.element_size() for t in imp.tensors)
        return stats

    @staticmethod
    def _group(tensors):
        sharded = [t for t in tensors if D.is_sharded(t)]
        return D.shard_group(sharded[0]) if sharded else None

    @staticmethod
    def _threshold_mask(key: torch.Tensor, use_abs: bool, value: float) -> torch.Tensor:
        """Packed mask of key > value; for a sharded key, this rank's rows as a DTensor."""
        local = D.local(key)
        mask = ops.pack_mask((local.abs() if use_abs else local) > value)
        return D.shard_rows_like(mask, key) if D.is_sharded(key) else mask

    @staticmethod
    def _zero(module: MaskedLinear) -> None:
        weight = module.weight
        keep = D.local_rows(module.dense_mask(), weight)
        D.local(weight.data).mul_(keep.to(weight.dtype))
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
        # Masks and scores live in the model's state_dict; this is the event bookkeeping (and the
        # criterion's gradient statistics while it still needs them).
        state = {"t": self.t, "last_event": self.last_event, "events": self.events, "sparsity": self.sparsity,
                 "finalized": int(self.finalized)}
        if self.grad_stats is not None:
            state["stats"] = [s.state_dict() for s in self.grad_stats]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict() after the model's state (masks) of the same checkpoint."""
        self.last_event, self.events, self.sparsity = int(state["last_event"]), int(state["events"]), float(state["sparsity"])
        self.t = int(state.get("t", max(self.last_event, 0)))
        if self.grad_stats is not None:
            if "stats" in state:
                for held, saved in zip(self.grad_stats, state["stats"], strict=True):
                    held.load_state_dict(saved)
            elif self.wants_gradients():
                raise ValueError(f"criterion {self.criterion_name!r} needs its gradient statistics to resume before "
                                 "its last event: the saved state has none")
            else:
                self.grad_stats = None
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
