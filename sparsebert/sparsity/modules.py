"""MaskedLinear: an nn.Linear whose forward goes through the sparsebert masked ops."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class MaskedLinear(nn.Linear):
    """nn.Linear with a bit-packed `mask` buffer (and, for movement pruning, a `scores` Parameter).

    It subclasses nn.Linear so transformers code that inspects `.weight`/`.in_features` keeps
    working. The mask is only ever updated in place (`mask.copy_`): MaskedAdamW holds it by reference.
    `weight_is_masked` promises weight == 0 wherever mask == 0, which lets the op skip the product.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, scores: bool = False):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("mask", ops.pack_mask(torch.ones(out_features, in_features, dtype=torch.bool, device=device)))
        if scores:
            self.scores = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))
        else:
            self.register_parameter("scores", None)
        self.weight_is_masked = False
        self.quantizer: nn.Module | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, scores: bool = False) -> "MaskedLinear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype, scores=scores)
        # Share the Parameters (not copies): keeps tied weights tied and references held elsewhere valid.
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def dense_mask(self) -> torch.Tensor:
        return ops.unpack_mask(self.mask, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        """W * M: what the forward multiplies by (used for export and reports, not in training)."""
        return self.weight * self.dense_mask().to(self.weight.dtype)

    def nnz(self) -> int:
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
        return ops.masked_linear(x, weight, self.mask, bias, weight_is_masked=self.weight_is_masked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.nnz() / self.weight.numel():.4f}, scores={self.scores is not None}"
