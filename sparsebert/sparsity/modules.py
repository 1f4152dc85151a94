"""MaskedLinear: an nn.Linear whose forward goes through the sparsebert masked ops."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops, zeros


class MaskedLinear(nn.Linear):
    """nn.Linear with a bit-packed `mask` buffer (and, for movement pruning, a `scores` Parameter).

    It subclasses nn.Linear so transformers code that inspects `.weight`/`.in_features` keeps
    working. The mask is only ever updated in place (`mask.copy_`): MaskedAdamW holds it by reference.

    `weight_is_masked = True` promises weight == 0 wherever mask == 0 and makes the module the keeper of
    those zeros (sparsebert.zeros): the forward then skips the masked product, but only while neither
    weight nor mask has changed in place since the promise (or its renewal by a masked optimizer); any
    other change makes it mask the product again, and an optimizer step without the mask is followed by
    re-zeroing. Under torch.compile the forward always masks the product (version counters cannot be
    branched on in a graph).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, scores: bool = False):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("mask", ops.pack_mask(torch.ones(out_features, in_features, dtype=torch.bool, device=device)))
        if scores:
            self.scores = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))
        else:
            self.register_parameter("scores", None)
        self._zeros_at: tuple | None = None  # (weight, mask, their versions) when known 0 outside the mask
        self._keeps_zeros = False  # pruned weights belong at 0: keeper of the weight's zeros
        self.quantizer: nn.Module | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, scores: bool = False) -> "MaskedLinear":
        """A MaskedLinear (all kept) sharing `linear`'s weight and bias Parameters."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype, scores=scores)
        # Share the Parameters (not copies): keeps tied weights tied and references held elsewhere valid.
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    @property
    def weight_is_masked(self) -> bool:
        """Whether the weight is known to be 0 wherever the mask is 0 right now."""
        return self.zeros_hold()

    @weight_is_masked.setter
    def weight_is_masked(self, value: bool) -> None:
        self._keeps_zeros = bool(value)
        if value:
            zeros.register(self.weight, self)
            self.renew_zeros()
        else:
            zeros.unregister(self.weight, self)
            self._zeros_at = None

    def zeros_hold(self) -> bool:
        """Whether weight and mask are the very tensors, at the very versions, of the last promise."""
        at, weight, mask = self._zeros_at, self.weight, self.mask
        return (at is not None and at[0] is weight and at[1] is mask and at[2] == weight._version
                and at[3] == mask._version)

    def renew_zeros(self) -> None:
        """Promise now that the weight is 0 wherever the mask is 0 (the caller has just made it so)."""
        self._zeros_at = (self.weight, self.mask, self.weight._version, self.mask._version)

    @torch.no_grad()
    def rezero_(self) -> None:
        """Write 0 at the pruned positions of the weight and renew the promise."""
        self.weight.mul_(self.dense_mask())
        self.renew_zeros()

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda() keep zeros at zero but give the mask a new tensor: carry the promise over.
        held = self.zeros_hold()
        out = super()._apply(fn, recurse)
        if self._keeps_zeros:
            zeros.register(self.weight, self)  # the weight may be a new Parameter now
        if held:
            self.renew_zeros()
        return out

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self._keeps_zeros:  # a copy (deepcopy, unpickling) keeps its own zeros
            zeros.register(self.weight, self)

    def dense_mask(self) -> torch.Tensor:
        """The mask as a bool tensor of the weight's shape."""
        return ops.unpack_mask(self.mask, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        """W * M: what the forward multiplies by (used for export and reports, not in training)."""
        return self.weight * self.dense_mask().to(self.weight.dtype)

    def nnz(self) -> int:
        """Kept weights (set bits of the mask)."""
        return ops.mask_nnz(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, scores = self.weight, self.bias, self.scores
        if torch.is_autocast_enabled(x.device.type):
            # Custom ops are not autocast: cast like nn.Linear would (the casts are differentiable).
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            scores = scores.to(dtype) if scores is not None else None
        if self.quantizer is not None:
            x, weight = self.quantizer(x, weight)
        if scores is not None and self.scores.requires_grad and torch.is_grad_enabled():
            return ops.movement_linear(x, weight, scores, self.mask, bias)
        promised = not torch.compiler.is_compiling() and self.zeros_hold()
        return ops.masked_linear(x, weight, self.mask, bias, weight_is_masked=promised)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.nnz() / self.weight.numel():.4f}, scores={self.scores is not None}"
