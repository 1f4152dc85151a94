"""Mask patterns: how importance scores become bit-packed masks, always via sparsebert.ops.topk_masks.

Each pattern returns (masks, expected_nnz): the kept count the pattern promises for this sparsity, which
the pruner checks against the counted masks (every pruning event is exact).
"""
from __future__ import annotations

import torch

from .. import ops
from ..distributed import is_sharded
from ..families import matrix_role
from ..ops import kept_count as _kept
from ..registry import Registry
from .criteria import Importance

PATTERNS: Registry = Registry("pattern")


def _check(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


@PATTERNS.register("global")
def global_(imp: Importance, sparsity: float, **_):
    """One ranking over every pruned matrix (layers end up with different sparsities)."""
    _check(sparsity)
    masks, _ = ops.topk_masks(imp.tensors, sparsity=sparsity, scope="global", use_abs=imp.use_abs)
    return masks, _kept(sum(t.numel() for t in imp.tensors), sparsity)


@PATTERNS.register("tensor")
def tensor(imp: Importance, sparsity: float, **_):
    """The same sparsity in every matrix (per-layer/uniform pruning)."""
    _check(sparsity)
    masks, _ = ops.topk_masks(imp.tensors, sparsity=sparsity, scope="tensor", use_abs=imp.use_abs)
    return masks, sum(_kept(t.numel(), sparsity) for t in imp.tensors)


@PATTERNS.register("row")
def row(imp: Importance, sparsity: float, **_):
    """The same sparsity in every output row (balanced, friendly to row-parallel kernels)."""
    _check(sparsity)
    masks, _ = ops.topk_masks(imp.tensors, sparsity=sparsity, scope="row", use_abs=imp.use_abs)
    return masks, sum(t.shape[0] * _kept(t.shape[1], sparsity) for t in imp.tensors)


@PATTERNS.register("nm")
def nm(imp: Importance, sparsity: float, *, n: int = 2, m: int = 4, **_):
    """N of every M consecutive weights in a row (2:4 for sparse tensor cores); the sparsity is 1 - n/m,
    reached in one event: a schedule's sparsity below that keeps everything."""
    _check(sparsity)
    if sparsity < 1 - n / m:
        return [ops.pack_mask(torch.ones_like(t, dtype=torch.bool)) for t in imp.tensors], sum(t.numel() for t in imp.tensors)
    masks, _ = ops.topk_masks(imp.tensors, scope="nm", n=n, m=m, use_abs=imp.use_abs)
    return masks, sum(t.numel() // m * n for t in imp.tensors)


@PATTERNS.register("block")
def block(imp: Importance, sparsity: float, *, block: tuple[int, int] = (1, 4), block_norm: str = "l1", **_):
    """Whole blocks ranked globally by their norm."""
    _check(sparsity)
    block = tuple(block)
    masks, _ = ops.topk_masks(imp.tensors, sparsity=sparsity, scope="block", use_abs=imp.use_abs, block=block, block_norm=block_norm)
    blocks = sum(t.numel() // (block[0] * block[1]) for t in imp.tensors)
    return masks, _kept(blocks, sparsity) * block[0] * block[1]


# Structured pruning: heads (rows of query/key/value, columns of the attention output) and FFN neurons
# (rows of ffn-in, columns of ffn-out). Group importance = sum of the element importance.
QKV = ("query", "key", "value")


def encoder_layers(names: list[str]) -> dict[int, dict[str, int]]:
    """{layer index: {role: position in names}} for layers whose six matrices are all present."""
    layers: dict[int, dict[str, int]] = {}
    for pos, name in enumerate(names):
        place = matrix_role(name)
        if place is not None:
            layers.setdefault(place[0], {})[place[1]] = pos
    incomplete = [i for i, roles in layers.items() if len(roles) != 6]
    if incomplete or len(layers) * 6 != len(names):
        raise ValueError(f"structured pruning needs exactly the six encoder matrices of each layer; incomplete: {incomplete}")
    return layers


@PATTERNS.register("structured")
def structured(imp: Importance, sparsity: float, *, names: list[str], num_heads: int, scope: str = "global", **_):
    """Prune the same fraction of attention heads and of FFN neurons (so about `sparsity` of the weights),
    ranked over all layers (scope "global") or within each layer (scope "tensor")."""
    _check(sparsity)
    if any(is_sharded(t) for t in imp.tensors):
        raise ValueError("the structured pattern ranks heads and neurons over whole matrices and does not run on "
                         "FSDP2-sharded weights: use DDP (--distributed ddp) for it")
    keys = [t.abs() if imp.use_abs else t for t in imp.tensors]
    layers = encoder_layers(names)
    heads, neurons = [], []
    for roles in layers.values():
        head_dim = keys[roles["query"]].shape[0] // num_heads
        per_head = sum(keys[roles[r]].reshape(num_heads, head_dim, -1).sum((1, 2)) for r in QKV)
        out = keys[roles["attn-out"]]
        per_head = per_head + out.reshape(out.shape[0], num_heads, head_dim).sum((0, 2))
        heads.append(per_head.float())
        neurons.append((keys[roles["ffn-in"]].sum(1) + keys[roles["ffn-out"]].sum(0)).float())
    head_masks, _ = ops.topk_masks(heads, sparsity=sparsity, scope=scope, use_abs=False)
    neuron_masks, _ = ops.topk_masks(neurons, sparsity=sparsity, scope=scope, use_abs=False)
    masks: list[torch.Tensor | None] = [None] * len(keys)
    kept_heads = kept_neurons = expected = 0
    for roles, hm, nmask, h, n in zip(layers.values(), head_masks, neuron_masks, heads, neurons):
        keep_h, keep_n = ops.unpack_mask(hm, h.numel()), ops.unpack_mask(nmask, n.numel())
        kept_heads, kept_neurons = kept_heads + int(keep_h.sum()), kept_neurons + int(keep_n.sum())
        for r in QKV:
            shape = keys[roles[r]].shape
            masks[roles[r]] = keep_h.repeat_interleave(shape[0] // num_heads)[:, None].expand(shape)
            expected += int(keep_h.sum()) * (shape[0] // num_heads) * shape[1]
        shape = keys[roles["attn-out"]].shape
        masks[roles["attn-out"]] = keep_h.repeat_interleave(shape[1] // num_heads)[None, :].expand(shape)
        expected += int(keep_h.sum()) * (shape[1] // num_heads) * shape[0]
        masks[roles["ffn-in"]] = keep_n[:, None].expand(keys[roles["ffn-in"]].shape)
        masks[roles["ffn-out"]] = keep_n[None, :].expand(keys[roles["ffn-out"]].shape)
        expected += int(keep_n.sum()) * (keys[roles["ffn-in"]].shape[1] + keys[roles["ffn-out"]].shape[0])
    want_h = _kept(sum(h.numel() for h in heads), sparsity) if scope == "global" else sum(_kept(h.numel(), sparsity) for h in heads)
    want_n = _kept(sum(n.numel() for n in neurons), sparsity) if scope == "global" else sum(_kept(n.numel(), sparsity) for n in neurons)
    if (kept_heads, kept_neurons) != (want_h, want_n):
        raise RuntimeError(f"structured pattern kept {kept_heads} heads/{kept_neurons} neurons, expected {want_h}/{want_n}")
    return [ops.pack_mask(m.contiguous()) for m in masks], expected
