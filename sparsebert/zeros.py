"""Pruned weights kept at exactly 0, whatever optimizer steps them.

A module whose pruned weights belong at 0 (a MaskedLinear after magnitude pruning or a pattern lock)
registers as the *keeper* of its weight. Its forward skips the masked product only while the weight
is known to be 0 outside the mask; the keeper dates that knowledge with the version counters of weight
and mask, so that any in-place change of either (an optimizer step, ``load_state_dict``) voids it and
the forward masks the product again.

After every ``torch.optim.Optimizer`` step, a global post-step hook (registered by
:mod:`sparsebert.optim`) looks at the keepers of the parameters just stepped:

* a sparsebert masked optimizer that stepped a weight with its keeper's mask wrote 0 at the pruned
  positions itself, and renews the keeper's knowledge inside its step;
* any other optimizer (``torch.optim.AdamW``, ``SGD``, the transformers ``Trainer``'s default) had
  the pruned weights re-zeroed after its step and gives one :class:`UnmaskedOptimizerWarning`
  naming ``MaskedAdamW``.

In-place writes through ``.data`` are invisible to version counters and optimizer hooks alike.
"""
from __future__ import annotations

import weakref
from typing import Protocol

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["UnmaskedOptimizerWarning", "ZeroKeeper", "keepers", "register", "unregister"]


class UnmaskedOptimizerWarning(UserWarning):
    """An optimizer without sparsebert masks stepped weights whose pruned entries must stay 0."""


class ZeroKeeper(Protocol):
    """What the optimizers need of a keeper (sparsebert.sparsity.MaskedLinear implements it)."""

    mask: Tensor

    def zeros_hold(self) -> bool:
        """Whether the weight is known to be 0 wherever the mask is 0 right now."""

    def renew_zeros(self) -> None:
        """Date the knowledge now: the caller has just made the weight 0 outside the mask."""

    def rezero_(self) -> None:
        """Write 0 at the pruned positions of the weight, and renew."""


_KEEPERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register(weight: Tensor, keeper: ZeroKeeper) -> None:
    """Make `keeper` responsible for the zeros of `weight` (idempotent)."""
    _KEEPERS.setdefault(weight, weakref.WeakSet()).add(keeper)


def unregister(weight: Tensor, keeper: ZeroKeeper) -> None:
    """Undo :func:`register` (nothing happens for a weight or keeper not registered)."""
    held = _KEEPERS.get(weight)
    if held is not None:
        held.discard(keeper)


def keepers(weight: Tensor) -> list[ZeroKeeper]:
    """The live keepers of `weight`; empty for most parameters."""
    if not _KEEPERS:
        return []
    held = _KEEPERS.get(weight)
    return list(held) if held else []
