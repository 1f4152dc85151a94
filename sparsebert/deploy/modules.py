"""The inference layers a converted model holds in place of its pruned nn.Linear modules."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import SparseWeight


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` packed by its nonzeros (:func:`sparsebert.ops.sparse_linear`).

    Inference only: the packed weight and the bias are buffers, not parameters.
    """

    def __init__(self, packed: SparseWeight, bias: Tensor | None):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.register_buffer("values", packed.values)
        self.register_buffer("columns", packed.columns)
        self.register_buffer("row_offsets", packed.row_offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def packed(self) -> SparseWeight:
        return SparseWeight(self.values, self.columns, self.row_offsets, self.in_features)

    def dense_weight(self) -> Tensor:
        """The dense weight, zeros where pruned."""
        return ops.unpack_sparse(self.packed)

    def kept(self) -> Tensor:
        """Bool [out, in]: the stored entries (all of a kept block, zeros included)."""
        return ops.unpack_sparse(self.packed._replace(values=torch.ones_like(self.values))).bool()

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type) and x.dtype != self.values.dtype:
            # Custom ops are not autocast; the packed weight has one dtype, so the input follows it.
            x = x.to(self.values.dtype)
        return ops.sparse_linear(x, self.values, self.columns, self.row_offsets, self.bias)

    def extra_repr(self) -> str:
        density = self.values.numel() / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_rows={self.values.shape[1]}, density={density:.4f}, bias={self.bias is not None}")


def dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A frozen nn.Linear holding ``weight`` (pruned entries as zeros): the dense-GEMM choice."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear


def check_semi_structured(weight: Tensor, name: str = "weight") -> None:
    """PyTorch's 2:4 kernels need a CUDA GPU of compute capability 8.0+, float16 or bfloat16, and at most
    2 nonzeros in every 4 consecutive weights of a row."""
    if weight.device.type != "cuda":
        raise ValueError(f"{name}: the 2:4 semi-structured kernel needs a CUDA GPU (compute capability 8.0+); the "
                         f"weight is on {weight.device}. Use kernel 'sparse' or 'auto' on this device")
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        raise ValueError(f"{name}: the 2:4 semi-structured kernel needs compute capability 8.0+, "
                         f"{torch.cuda.get_device_name(weight.device)} has {major}.{minor}")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: the 2:4 semi-structured kernel needs float16 or bfloat16 weights, got {weight.dtype}")
    if weight.shape[1] % 4 or bool(((weight != 0).view(weight.shape[0], -1, 4).sum(-1) > 2).any()):
        raise ValueError(f"{name}: the 2:4 semi-structured kernel needs at most 2 nonzeros in every 4 consecutive "
                         f"weights of a row; this {tuple(weight.shape)} weight is not 2:4-pruned")


def semi_structured_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear whose weight is PyTorch's 2:4 semi-structured sparse tensor (sparse tensor cores)."""
    check_semi_structured(weight)
    linear = dense_linear(weight, bias)
    linear.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(linear.weight), requires_grad=False)
    return linear
