"""Importance criteria: which weights matter. A criterion maps masked modules to score tensors
shaped like their weights; a mask pattern (patterns.py) then turns scores into masks.

Count-based criteria are ranked by `sparsebert.ops.topk_masks`; threshold-based ones (soft movement,
pattern lock) keep `key > threshold` and their sparsity is whatever the threshold gives (counted).
A criterion also says what it asks of the pruning around it (learnable scores, a loss penalty, a
last exact event, gradient statistics, a weight update after each event), so that methods look it up
instead of testing its name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..registry import Registry
from .fisher import BlockFisher
from .modules import MaskedLinear


@dataclasses.dataclass
class Importance:
    """What a criterion ranks: one key tensor per module, by |key| or by value, by count or threshold."""

    tensors: list[torch.Tensor]
    use_abs: bool
    by_threshold: bool = False  # select key > threshold (the schedule's value) instead of the top count


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A ranking of weights for pruning, with the traits the pruner and the methods act on."""

    rank: Callable[..., tuple[list[torch.Tensor], bool]]  # (modules[, stats]) -> (keys, rank by |key|)
    #: Ranks learnable scores: the modules carry them, and pruned weights keep their values (a revived
    #: weight resumes where it was) until the pruner's finalize() zeroes them.
    learns_scores: bool = False
    #: The schedule's value is a threshold on the keys, not a sparsity.
    by_threshold: bool = False
    #: A loss term on the scores that drives the sparsity (soft movement's L1), or None.
    penalty: Callable[[list[MaskedLinear]], torch.Tensor] | None = None
    #: A count-based criterion for one last event that makes the final sparsity exact, or None.
    exact: str | None = None
    #: Gradient statistics the ranking reads: built per module as stats(module, **criterion_kwargs),
    #: fed every optimizer step's gradient (`add(grad)`) until the last event, and passed to rank();
    #: None for criteria that read the weights alone.
    stats: Callable[..., object] | None = None
    #: After an event has written the masks: update(modules, stats, newly pruned masks) moves the kept
    #: weights to make up for the pruned ones (OBS), before they are zeroed; or None.
    update: Callable[[list[MaskedLinear], list, list[torch.Tensor]], None] | None = None

    def check_options(self, name: str, options: dict) -> None:
        """ValueError for options this criterion does not take (criterion_kwargs), before anything is built."""
        if self.stats is None:
            if options:
                raise ValueError(f"criterion {name!r} takes no criterion_kwargs, got {options!r}")
            return
        try:
            self.stats(torch.nn.Linear(1, 1, device="meta"), **options)
        except TypeError as error:
            raise ValueError(f"criterion {name!r}: bad criterion_kwargs: {error}") from None

    def __call__(self, modules: list[MaskedLinear], stats: list | None = None) -> Importance:
        tensors, use_abs = self.rank(modules, stats) if self.stats is not None else self.rank(modules)
        return Importance(tensors, use_abs, self.by_threshold)


CRITERIA: Registry[Criterion] = Registry("criterion")


def criterion(name: str, **traits: object) -> Callable:
    """Register the decorated ranking function as criterion `name` with the given Criterion traits."""
    def add(rank):
        CRITERIA.register(name)(Criterion(rank, **traits))
        return rank
    return add


def _scores(modules: list[MaskedLinear], name: str) -> list[torch.Tensor]:
    if any(m.scores is None for m in modules):
        raise ValueError(f"criterion {name!r} needs movement scores: sparsify with {{'scores': True}}")
    return [m.scores.detach() for m in modules]


def soft_movement_penalty(modules: list[MaskedLinear]) -> torch.Tensor:
    """Sanh et al.'s L1 regulariser: mean of sigmoid(S) over all scored weights (the count of kept ones,
    relaxed). Its gradient flows straight to the scores."""
    total = sum(torch.sigmoid(m.scores).sum() for m in modules)
    return total / sum(m.scores.numel() for m in modules)


@criterion("magnitude")
def magnitude(modules):
    return [m.weight.detach() for m in modules], True


@criterion("movement", learns_scores=True)
def movement(modules):
    """Sanh et al. hard movement: top-k of the learned scores S (signed; S accumulates -W * dL/dW)."""
    return _scores(modules, "movement"), False


@criterion("soft-movement", learns_scores=True, by_threshold=True, penalty=soft_movement_penalty, exact="movement")
def soft_movement(modules):
    """Sanh et al. soft movement: keep sigmoid(S) > threshold; sparsity comes from the L1 penalty
    on sigmoid(S), not from a count; one last movement event makes it exact."""
    return [torch.sigmoid(s) for s in _scores(modules, "soft-movement")], False


def _fisher(module: MaskedLinear, **kwargs) -> BlockFisher:
    return BlockFisher(module.out_features, module.in_features, device=module.weight.device, **kwargs)


def _obs_update(modules, stats, pruned) -> None:
    for module, fisher, newly in zip(modules, stats, pruned):
        fisher.compensate_(module.weight.data, newly)
        fisher.release()


@criterion("obert", stats=_fisher, update=_obs_update)
def obert(modules, stats):
    """oBERT (Kurtic et al., 2022): the OBS loss of pruning each weight, w^2 / (2 [F^-1]_qq), with the
    block-diagonal empirical Fisher of the gradients seen (sparsity/fisher.py); after each event the
    kept weights of a block move to make up for its pruned ones. Magnitude before any gradient."""
    return [fisher.saliency(m.weight.detach()) for m, fisher in zip(modules, stats)], False


@criterion("nonzero", by_threshold=True)
def nonzero(modules):
    """Pattern lock: with threshold 0, keeps exactly the weights that are not zero now."""
    return [m.weight.detach() for m in modules], True
