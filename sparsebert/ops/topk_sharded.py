"""`topk_masks` on DTensors sharded on dim 0 over a 1-D mesh (FSDP2 `fully_shard` parameters).

Every rank works on its own shard and the masks are those of the whole tensors, bit for bit, without
gathering the scores: a global or per-tensor selection finds its threshold with the radix-select
histograms all-reduced over the shards (`find_thresholds`: a few KiB per pass for all tensors at
once); rows and N:M groups lie inside a shard, so they need no communication. The masks come back
as DTensors sharded like the scores (packed rows follow the weight rows).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed as D
from . import topk as T


def _collectives(group):
    def all_reduce(t: Tensor) -> None:
        D.all_reduce(t, group)

    def all_gather(t: Tensor) -> Tensor:
        return D.all_gather(t, group)
    return all_reduce, all_gather


def _thresholds(values: list[float], group, device) -> Tensor:
    """Per-tensor minima of values over the ranks (the smallest kept score of each whole tensor)."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    return D.all_reduce(t, group, dist.ReduceOp.MIN)


def topk_masks(tensors: Sequence[Tensor], *, k: int | None, sparsity: float | None, scope: str, use_abs: bool,
               n: int, m: int) -> tuple[list[Tensor], Tensor]:
    """Sharded `sparsebert.ops.topk_masks` (its arguments already checked) for scopes global, tensor,
    row and nm."""
    if scope not in ("global", "tensor", "row", "nm"):
        raise ValueError(f"topk_masks: scope {scope!r} is not supported on sharded (DTensor) scores; "
                         "scopes global, tensor, row and nm are")
    if any(x.dim() != 2 for x in tensors):
        raise ValueError("topk_masks: sharded (DTensor) scores must be 2-D, sharded on their rows")
    groups = {id(D.shard_group(x)) for x in tensors}
    if len(groups) != 1:
        raise ValueError("topk_masks: every sharded tensor must be sharded over the same process group")
    group = D.shard_group(tensors[0])
    shards = [D.local(x) for x in tensors]
    device = shards[0].device
    all_reduce, all_gather = _collectives(group)
    rank = D.rank(group)
    if scope in ("global", "tensor"):
        if scope == "global":
            found = T.find_thresholds([shards], [T._kept(sum(x.numel() for x in tensors), k, sparsity, "all tensors")],
                                      use_abs, all_reduce, all_gather, rank)
            key, ties = found[0]
            masks = T.topk_mask_from_threshold(shards, use_abs, key, ties)
            threshold = torch.tensor(T.key_to_value(key) if key != 0xFFFFFFFF else math.inf, dtype=torch.float32)
        else:
            ks = [T._kept(x.numel(), k, sparsity, f"tensors[{i}]") for i, x in enumerate(tensors)]
            found = T.find_thresholds([[s] for s in shards], ks, use_abs, all_reduce, all_gather, rank)
            masks = [T.topk_mask_from_threshold([s], use_abs, key, ties)[0] for s, (key, ties) in zip(shards, found)]
            threshold = torch.tensor([T.key_to_value(key) if key != 0xFFFFFFFF else math.inf for key, _ in found],
                                     dtype=torch.float32)
    else:
        if scope == "row":
            masks = [T.topk_mask_rows(s, T._kept(x.shape[-1], k, sparsity, f"a row of tensors[{i}]"), use_abs)
                     for i, (s, x) in enumerate(zip(shards, tensors))]
        else:
            masks = [T.nm_mask(s, n, m, use_abs) for s in shards]
        threshold = _thresholds([float(T._min_kept(s, mk, use_abs)) for s, mk in zip(shards, masks)], group, device)
    return [D.shard_rows_like(mk, x) for mk, x in zip(masks, tensors)], threshold.to(device)
