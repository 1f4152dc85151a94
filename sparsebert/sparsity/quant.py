"""8-bit quantization-aware training on top of a locked sparsity pattern (Prune OFA's last stage).

Per-tensor symmetric fake quantization with a straight-through estimator, no torch.ao: zeros stay
exactly zero (symmetric, no zero point), so the sparsity pattern survives quantization.
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import max_over_ranks
from .modules import MaskedLinear


def fake_quantize(x: torch.Tensor, max_abs: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round to the symmetric grid of `bits` bits over [-max_abs, max_abs]; gradient passes straight through."""
    qmax = 2 ** (bits - 1) - 1
    scale = (max_abs.detach().float().clamp_min(1e-8) / qmax).to(x.dtype)
    q = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    return x + (q - x).detach()


class FakeQuant(nn.Module):
    """Weights quantized by their current max |w|; inputs by an EMA of their max |x| (Q8BERT style)."""

    def __init__(self, bits: int = 8, momentum: float = 0.9):
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.register_buffer("input_max", torch.zeros(()))

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            with torch.no_grad():
                current = max_over_ranks(x.detach().abs().max().float())
                first = self.input_max == 0
                self.input_max.copy_(torch.where(first, current, self.momentum * self.input_max + (1 - self.momentum) * current))
        return fake_quantize(x, self.input_max, self.bits), fake_quantize(weight, weight.detach().abs().max(), self.bits)


def enable_qat(modules: dict[str, MaskedLinear], bits: int = 8) -> None:
    """Quantization-aware training: fake-quantize the inputs and weights of these modules' forward."""
    for module in modules.values():
        module.quantizer = FakeQuant(bits).to(module.weight.device)
