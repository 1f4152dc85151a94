"""Sparse linear layers for inference: ``y = x @ W^T + b`` with ``W`` packed by its nonzeros.

The packed format (see csrc/sparse_linear.h) stores ``W [out, in]`` as ``R x 1`` blocks, ``R`` (rows
per block) 1 or 4: block row ``g`` (output rows ``[g R, g R + R)``) owns the blocks
``row_offsets[g] : row_offsets[g + 1]``, each a column index and ``R`` values. ``R = 1`` is row
CSR; ``R = 4`` serves 4x1 block-pruned weights, where one activation load feeds four rows.
:func:`pack_sparse` builds it from a weight (and optionally its bit-packed mask).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .mask import unpack_mask

__all__ = ["SparseWeight", "pack_sparse", "unpack_sparse", "sparse_linear", "block_rows_of"]

_ops = torch.ops.sparsebert
_BLOCK_ROWS = (1, 4)


class SparseWeight(NamedTuple):
    """A weight packed for :func:`sparse_linear`."""

    values: Tensor  # [nblocks, R], the weight's dtype
    columns: Tensor  # [nblocks], int16 (in_features <= 32767) or int32
    row_offsets: Tensor  # [out_features / R + 1], int32
    in_features: int

    @property
    def block_rows(self) -> int:
        return self.values.shape[1]

    @property
    def out_features(self) -> int:
        return (self.row_offsets.shape[0] - 1) * self.block_rows

    def nbytes(self) -> int:
        """Bytes of the packed arrays (values, columns, row offsets)."""
        return sum(t.numel() * t.element_size() for t in self[:3])


def _keep(weight: Tensor, mask: Tensor | None) -> Tensor:
    if weight.dim() != 2:
        raise ValueError(f"pack_sparse: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if mask is None:
        return weight != 0
    expected = (weight.shape[0], (weight.shape[1] + 7) // 8)
    if mask.dtype != torch.uint8 or tuple(mask.shape) != expected:
        raise ValueError(f"pack_sparse: mask/weight mismatch: a bit-packed uint8 mask of shape {expected} is needed "
                         f"for a weight of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    return unpack_mask(mask.to(weight.device), weight.shape[1])


def block_rows_of(keep: Tensor) -> int:
    """The largest supported R such that the kept set ``keep [out, in]`` consists of whole R x 1 blocks."""
    out, cols = keep.shape
    if out % 4 == 0 and out > 0:
        blocks = keep.view(out // 4, 4, cols)
        if bool((blocks.any(1) == blocks.all(1)).all()):
            return 4
    return 1


def pack_sparse(weight: Tensor, mask: Tensor | None = None, *, block_rows: int | None = None) -> SparseWeight:
    """Pack ``weight * mask`` (``mask`` bit-packed as in :mod:`sparsebert.ops.mask`; ``None`` keeps the
    nonzeros of ``weight``). ``block_rows`` None picks 4 when the kept set is made of whole 4x1 blocks
    (4 consecutive output rows sharing a column), else 1. Kept zeros inside a block are stored as 0."""
    keep = _keep(weight, mask)
    out, cols = weight.shape
    r = block_rows_of(keep) if block_rows is None else block_rows
    if r not in _BLOCK_ROWS:
        raise ValueError(f"pack_sparse: block_rows must be one of {_BLOCK_ROWS}, got {block_rows}")
    if out % r:
        raise ValueError(f"pack_sparse: block_rows={r} does not divide out_features={out}")
    w = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    blocks = keep.view(out // r, r, cols).any(1)
    groups, columns = blocks.nonzero(as_tuple=True)
    values = w.view(out // r, r, cols)[groups, :, columns]
    if values.numel() >= 2**31:
        raise ValueError(f"pack_sparse: {values.numel()} nonzeros exceed the int32 row offsets")
    row_offsets = torch.zeros(out // r + 1, dtype=torch.int32, device=weight.device)
    row_offsets[1:] = blocks.sum(1).cumsum(0)
    index_dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
    return SparseWeight(values.contiguous(), columns.to(index_dtype), row_offsets, cols)


def unpack_sparse(packed: SparseWeight) -> Tensor:
    """The dense ``[out_features, in_features]`` weight of a packed one (zeros where pruned)."""
    values, columns, row_offsets, cols = packed
    r = values.shape[1]
    groups = row_offsets.shape[0] - 1
    dense = values.new_zeros(groups, r, cols)
    owner = torch.repeat_interleave(torch.arange(groups, device=values.device), (row_offsets[1:] - row_offsets[:-1]).long())
    dense[owner, :, columns.long()] = values
    return dense.view(groups * r, cols)


def sparse_linear(x: Tensor, values: Tensor, columns: Tensor, row_offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` for a packed ``W`` (see :func:`pack_sparse`); inference only (no gradients).

    Args:
        x: ``[..., in_features]``, float32, bfloat16 or float16, any strides.
        values, columns, row_offsets: the packed weight (``values`` in ``x``'s dtype, on its device).
        bias: optional ``[out_features]``.

    Accumulates in float32. On the CPU the AVX-512 kernel runs where torch's CPU capability is AVX512
    (``ATEN_CPU_CAPABILITY`` selects a lower one), a portable kernel otherwise.
    """
    return _ops.sparse_linear(x, values, columns, row_offsets, bias)


@torch.library.register_fake("sparsebert::sparse_linear")
def _(x, values, columns, row_offsets, bias):
    torch._check(values.dim() == 2 and values.shape[1] in _BLOCK_ROWS,
                 lambda: f"sparse_linear: values must have shape [nblocks, R] with R 1 or 4, got {tuple(values.shape)}")
    torch._check(x.dim() >= 1, lambda: "sparse_linear: x must have at least one dimension, got a scalar")
    torch._check(row_offsets.dim() == 1 and row_offsets.shape[0] >= 1,
                 lambda: f"sparse_linear: row_offsets must have shape [out_features / R + 1], got {tuple(row_offsets.shape)}")
    return x.new_empty((*x.shape[:-1], (row_offsets.shape[0] - 1) * values.shape[1]))
