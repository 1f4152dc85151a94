"""topk_masks: the keep-masks of a sparsity or a count over the scopes sparsebert prunes by (global,
tensor, row, N:M, block), on plain tensors or on FSDP2's DTensor shards; built on the radix-select
ops of topk.py."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..distributed import is_sharded as _is_sharded
from .mask import pack_mask, unpack_mask
from .topk import _kept, nm_mask, topk_mask, topk_mask_rows
from .topk_sharded import topk_masks as sharded_topk_masks

__all__ = ["topk_masks"]

_SCOPES = ("global", "tensor", "row", "nm", "block")


def _block_scores(x: Tensor, block: tuple[int, int], norm: str) -> Tensor:
    br, bc = block
    x2 = x if x.dim() >= 2 else x.unsqueeze(0)
    rows, cols = x2.shape[-2], x2.shape[-1]
    if rows % br or cols % bc:
        raise ValueError(f"topk_masks: block {tuple(block)} must divide the last two dimensions, got shape {tuple(x2.shape)}")
    blocks = x2.float().reshape(*x2.shape[:-2], rows // br, br, cols // bc, bc)
    if norm == "l1":
        return blocks.abs().sum((-3, -1))
    return blocks.square().sum((-3, -1)).sqrt()


def _expand_blocks(packed: Tensor, x: Tensor, block: tuple[int, int]) -> Tensor:
    br, bc = block
    x2 = x if x.dim() >= 2 else x.unsqueeze(0)
    keep = unpack_mask(packed, x2.shape[-1] // bc)
    keep = keep.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)
    return pack_mask(keep.reshape(x.shape))


def _min_kept(x: Tensor, packed: Tensor, use_abs: bool) -> Tensor:
    """The smallest kept score of x (+inf when nothing is kept)."""
    score = (x.abs() if use_abs else x).float()
    if x.numel() == 0:
        return score.new_tensor(math.inf)
    keep = unpack_mask(packed, x.shape[-1])
    return torch.where(keep, score, torch.full_like(score, math.inf)).amin()


def _sharded(tensors: list) -> bool:
    flags = {_is_sharded(x) for x in tensors}
    if len(flags) > 1:
        raise ValueError("topk_masks: tensors must be all DTensors (sharded) or all plain tensors")
    return flags == {True}


def topk_masks(
    tensors: Sequence[Tensor],
    *,
    k: int | None = None,
    sparsity: float | None = None,
    scope: str = "global",
    use_abs: bool = True,
    n: int = 2,
    m: int = 4,
    block: tuple[int, int] = (1, 4),
    block_norm: str = "l1",
) -> tuple[list[Tensor], Tensor]:
    """Bit-packed keep-masks of the largest scores (``|w|`` when ``use_abs``, else ``w``).

    Exactly one of ``k`` and ``sparsity`` (in [0, 1)); a sparsity keeps ``kept_count(N, sparsity)``
    (``N - floor(sparsity * N)`` on the decimal sparsity, exactly) of the N candidates of its scope. Ties go to the lower flat index. ``scope``:

    - ``"global"``: the k largest over all tensors together; threshold: the k-th largest score
      (0-d float32, +inf for k = 0).
    - ``"tensor"``: each tensor separately (k per tensor); threshold: one per tensor, 1-D.
    - ``"row"``: every row (last dimension) separately (k per row); threshold: the smallest kept
      score per tensor, 1-D.
    - ``"nm"``: ``n`` of every ``m`` consecutive elements along the last dimension (which m must
      divide); ``k`` must be omitted and ``sparsity`` omitted or equal to ``1 - n/m``; threshold as
      for rows.
    - ``"block"``: blocks of shape ``block`` over the last two dimensions (a 1-D tensor is one row),
      scored by their ``block_norm`` ("l1" or "l2") norm of the values (``use_abs`` does not
      apply), the k largest blocks over all tensors (k and N count blocks), expanded to element
      masks; threshold: the k-th largest block score.

    DTensors sharded on their rows (FSDP2 parameters) are ranked as the whole tensors, rank by rank
    without gathering them (scopes global, tensor, row, nm; see ``topk_sharded``); their masks are
    DTensors sharded alike.

    Raises ValueError for bad arguments; RuntimeError (from the op) for NaN/Inf inputs.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("topk_masks: tensors must not be empty")
    if scope not in _SCOPES:
        raise ValueError(f"topk_masks: scope must be one of {_SCOPES}, got {scope!r}")
    if scope == "nm":
        if k is not None:
            raise ValueError("topk_masks: scope='nm' takes n and m, not k")
        if not (1 <= m and 0 <= n <= m):
            raise ValueError(f"topk_masks: N:M needs 0 <= n <= m and m >= 1, got n={n}, m={m}")
        if sparsity is not None and not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(f"topk_masks: scope='nm' with n={n}, m={m} has sparsity {1 - n / m}, got {sparsity}")
        for i, x in enumerate(tensors):
            if x.shape[-1] % m:
                raise ValueError(f"topk_masks: the last dimension of tensors[{i}] ({x.shape[-1]}) must be divisible by m={m}")
        if _sharded(tensors):
            return sharded_topk_masks(tensors, k=k, sparsity=sparsity, scope=scope, use_abs=use_abs, n=n, m=m)
        masks = [nm_mask(x, n, m, use_abs) for x in tensors]
        return masks, torch.stack([_min_kept(x, mk, use_abs) for x, mk in zip(tensors, masks)])
    if (k is None) == (sparsity is None):
        raise ValueError("topk_masks: give exactly one of k and sparsity")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"topk_masks: sparsity must be in [0, 1), got {sparsity}")
    if any(x.dim() == 0 for x in tensors):
        raise ValueError("topk_masks: every tensor needs at least one dimension")
    if _sharded(tensors):
        return sharded_topk_masks(tensors, k=k, sparsity=sparsity, scope=scope, use_abs=use_abs, n=n, m=m)

    if scope == "global":
        return topk_mask(tensors, _kept(sum(x.numel() for x in tensors), k, sparsity, "all tensors"), use_abs)
    if scope == "tensor":
        results = [topk_mask([x], _kept(x.numel(), k, sparsity, f"tensors[{i}]"), use_abs) for i, x in enumerate(tensors)]
        return [mk[0] for mk, _ in results], torch.stack([t for _, t in results])
    if scope == "row":
        masks = [topk_mask_rows(x, _kept(x.shape[-1], k, sparsity, f"a row of tensors[{i}]"), use_abs)
                 for i, x in enumerate(tensors)]
        return masks, torch.stack([_min_kept(x, mk, use_abs) for x, mk in zip(tensors, masks)])
    # block
    if block_norm not in ("l1", "l2"):
        raise ValueError(f"topk_masks: block_norm must be 'l1' or 'l2', got {block_norm!r}")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"topk_masks: block must be two positive sizes, got {block}")
    block = (int(block[0]), int(block[1]))
    scores = [_block_scores(x, block, block_norm) for x in tensors]
    kept = _kept(sum(s.numel() for s in scores), k, sparsity, "blocks of all tensors")
    score_masks, threshold = topk_mask(scores, kept, True)
    return [_expand_blocks(mk, x, block) for mk, x in zip(score_masks, tensors)], threshold
