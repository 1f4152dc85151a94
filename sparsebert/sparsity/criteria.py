"""Importance criteria: which weights matter. A criterion maps masked modules to score tensors
shaped like their weights; a mask pattern (patterns.py) then turns scores into masks.

Count-based criteria are ranked by `sparsebert.ops.topk_masks`; threshold-based ones (soft movement,
pattern lock) keep `key > threshold` and their sparsity is whatever the threshold gives (counted).
"""
from __future__ import annotations

import dataclasses

import torch

from .modules import MaskedLinear
from .registry import CRITERIA


@dataclasses.dataclass
class Importance:
    tensors: list[torch.Tensor]
    use_abs: bool
    by_threshold: bool = False  # select key > threshold (the schedule's value) instead of the top count


def _scores(modules: list[MaskedLinear], criterion: str) -> list[torch.Tensor]:
    missing = [i for i, m in enumerate(modules) if m.scores is None]
    if missing:
        raise ValueError(f"criterion {criterion!r} needs movement scores: sparsify with {{'scores': True}}")
    return [m.scores.detach() for m in modules]


@CRITERIA.register("magnitude")
def magnitude(modules: list[MaskedLinear]) -> Importance:
    return Importance([m.weight.detach() for m in modules], use_abs=True)


@CRITERIA.register("movement")
def movement(modules: list[MaskedLinear]) -> Importance:
    """Sanh et al. hard movement: top-k of the learned scores S (signed; S accumulates -W * dL/dW)."""
    return Importance(_scores(modules, "movement"), use_abs=False)


@CRITERIA.register("soft-movement")
def soft_movement(modules: list[MaskedLinear]) -> Importance:
    """Sanh et al. soft movement: keep sigmoid(S) > threshold; sparsity comes from the L1 penalty
    on sigmoid(S) (see `soft_movement_penalty`), not from a count."""
    return Importance([torch.sigmoid(s) for s in _scores(modules, "soft-movement")], use_abs=False, by_threshold=True)


@CRITERIA.register("nonzero")
def nonzero(modules: list[MaskedLinear]) -> Importance:
    """Pattern lock: with threshold 0, keeps exactly the weights that are not zero now."""
    return Importance([m.weight.detach() for m in modules], use_abs=True, by_threshold=True)


def soft_movement_penalty(modules: list[MaskedLinear]) -> torch.Tensor:
    """Sanh et al.'s L1 regulariser: mean of sigmoid(S) over all scored weights (the count of kept ones,
    relaxed). Its gradient flows straight to the scores."""
    total = sum(torch.sigmoid(m.scores).sum() for m in modules)
    return total / sum(m.scores.numel() for m in modules)
