"""Top-k magnitude selection: bit-packed keep-masks of the largest scores.

Every op ranks values by an order-preserving uint32 key of the value converted to float32
(of ``|value|`` when ``use_abs``), so results are identical across dtypes' float32 images,
devices and thread counts. Ties always go to the lower flat index (list order, then
row-major). Masks are bit-packed (see :mod:`sparsebert.ops.mask`) and not differentiable.
NaN or +-Inf in an input is an error.

The global selection is a radix select: :func:`topk_histogram` passes narrow down the
threshold key, :func:`topk_mask_from_threshold` writes the masks. :func:`topk_mask` does both in
one call; :func:`find_threshold` drives the histogram passes from Python with an
``all_reduce`` hook, for weights sharded over ranks.
"""
from __future__ import annotations

import struct
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "topk_histogram",
    "topk_mask_from_threshold",
    "topk_mask",
    "topk_mask_rows",
    "nm_mask",
    "find_threshold",
    "find_thresholds",
    "key_to_value",
    "kept_count",
]

_ops = torch.ops.sparsebert


def _mask_like(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], (x.shape[-1] + 7) // 8), dtype=torch.uint8)


# --- topk_histogram ---------------------------------------------------------------------


def topk_histogram(xs: Sequence[Tensor], use_abs: bool, prefix: int, prefix_bits: int, digit_bits: int) -> Tensor:
    """int64 histogram (``2**digit_bits`` bins) of key bits
    ``[32 - prefix_bits - digit_bits, 32 - prefix_bits)`` over the keys of all ``xs`` whose top
    ``prefix_bits`` bits equal ``prefix``. ``digit_bits`` in [1, 16]. Histograms of shards add up,
    which is what a distributed caller all-reduces."""
    return _ops.topk_histogram(list(xs), use_abs, prefix, prefix_bits, digit_bits)


@torch.library.register_fake("sparsebert::topk_histogram")
def _(xs, use_abs, prefix, prefix_bits, digit_bits):
    return xs[0].new_empty((1 << digit_bits,), dtype=torch.int64)


# --- topk_mask_from_threshold -----------------------------------------------------------


def topk_mask_from_threshold(xs: Sequence[Tensor], use_abs: bool, threshold_key: int, ties_to_keep: int) -> list[Tensor]:
    """Packed masks keeping the keys > ``threshold_key`` and the first ``ties_to_keep`` keys equal
    to it in flat order (list order, then row-major)."""
    return _ops.topk_mask_from_threshold(list(xs), use_abs, threshold_key, ties_to_keep)


@torch.library.register_fake("sparsebert::topk_mask_from_threshold")
def _(xs, use_abs, threshold_key, ties_to_keep):
    return [_mask_like(x) for x in xs]


# --- topk_mask --------------------------------------------------------------------------


def topk_mask(xs: Sequence[Tensor], k: int, use_abs: bool = True) -> tuple[list[Tensor], Tensor]:
    """Packed masks of exactly the ``k`` largest values over all ``xs`` together, and the k-th
    largest value (``|value|`` when ``use_abs``) as a 0-d float32 tensor (+inf for k = 0)."""
    masks, threshold = _ops.topk_mask(list(xs), k, use_abs)
    return list(masks), threshold


@torch.library.register_fake("sparsebert::topk_mask")
def _(xs, k, use_abs):
    return [_mask_like(x) for x in xs], xs[0].new_empty((), dtype=torch.float32)


# --- topk_mask_rows ---------------------------------------------------------------------


def topk_mask_rows(x: Tensor, k: int, use_abs: bool = True) -> Tensor:
    """Packed mask of exactly the ``k`` largest values of every row (last dimension); ties go to
    the lower column."""
    return _ops.topk_mask_rows(x, k, use_abs)


@torch.library.register_fake("sparsebert::topk_mask_rows")
def _(x, k, use_abs):
    return _mask_like(x)


# --- nm_mask ----------------------------------------------------------------------------


def nm_mask(x: Tensor, n: int = 2, m: int = 4, use_abs: bool = True) -> Tensor:
    """Packed N:M mask: the ``n`` largest of every ``m`` consecutive values along the last
    dimension (which ``m`` must divide); ties go to the lower index."""
    return _ops.nm_mask(x, n, m, use_abs)


@torch.library.register_fake("sparsebert::nm_mask")
def _(x, n, m, use_abs):
    return _mask_like(x)


# --- Python drivers ---------------------------------------------------------------------

def key_to_value(key: int) -> float:
    """The float32 value an order-preserving key stands for."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _select_buckets(hist: Tensor, ks: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of hist [G, bins]: (bucket holding the ks[g]-th largest, count strictly above it), 1-based ks."""
    above = hist.flip(1).cumsum(1).flip(1)  # above[g, b] = count in buckets >= b, non-increasing in b
    bucket = ((above >= ks[:, None]).sum(1) - 1).clamp(min=0)
    rows = torch.arange(hist.shape[0])
    return bucket, above[rows, bucket] - hist[rows, bucket]


def _digit_schedule(device: torch.device) -> tuple[int, ...]:
    # 16-bit digits suit the CPU's per-thread histograms; on a GPU 11/11/10 bits keep the
    # per-block histograms in shared memory.
    return (11, 11, 10) if device.type == "cuda" else (16, 16)


#: Digits of the sharded selection: three passes, each all-reducing a histogram of 2048 (then 1024) int64
#: per selection: 40 KiB a matrix in all. 16-bit digits (the CPU's two passes) would move 1 MiB a
#: matrix, more than gathering a 384 x 384 one; 8-bit digits move less but cost a fourth pass.
SHARDED_DIGITS = (11, 11, 10)


def find_threshold(
    tensors: Sequence[Tensor],
    k: int,
    use_abs: bool = True,
    all_reduce: Callable[[Tensor], Tensor | None] | None = None,
    all_gather: Callable[[Tensor], Tensor] | None = None,
    rank: int = 0,
) -> tuple[int, int]:
    """``(threshold_key, ties_to_keep)`` such that ``topk_mask_from_threshold(tensors, use_abs,
    threshold_key, ties_to_keep)`` keeps exactly the ``k`` largest values (ties to the lower flat
    index), by radix-select histogram passes (two 16-bit digits on CPU, 11/11/10 bits on CUDA,
    ``SHARDED_DIGITS`` when sharded). Use :func:`key_to_value` for the threshold value.

    Sharded weights: every rank calls this with its own shard (possibly empty tensors) and the
    *global* ``k``; ranks are ordered as the global flat order (rank r's tensors come after rank
    r-1's). ``all_reduce(hist)`` must sum an int64 tensor over ranks, in place (returning None, like
    ``torch.distributed.all_reduce``) or returning the sum. The threshold key is then global, but
    the ties to keep are per rank: rank r keeps what is left after the ties of ranks < r, which
    needs ``all_gather(t)`` returning the per-rank values of ``t`` stacked as ``[world, *t.shape]``,
    and this process's ``rank``. Per-rank kept counts then add up to ``k`` and the concatenated
    masks equal the single-process ones.
    """
    return find_thresholds([tensors], [k], use_abs, all_reduce, all_gather, rank)[0]


def find_thresholds(
    groups: Sequence[Sequence[Tensor]],
    ks: Sequence[int],
    use_abs: bool = True,
    all_reduce: Callable[[Tensor], Tensor | None] | None = None,
    all_gather: Callable[[Tensor], Tensor] | None = None,
    rank: int = 0,
) -> list[tuple[int, int]]:
    """:func:`find_threshold` for several independent selections (the top ``ks[g]`` of
    ``groups[g]``) at once: one ``all_reduce`` per pass for all of them (and one ``all_gather`` of
    the ties), so a per-tensor selection over sharded weights costs a few collectives, not a few
    per tensor."""
    if len(groups) != len(ks) or not groups:
        raise ValueError(f"find_thresholds: {len(groups)} groups and {len(ks)} ks; need one k per group, at least one")
    if any(k < 0 for k in ks):
        raise ValueError(f"find_threshold: k must be >= 0, got {min(ks)}")
    if all_reduce is not None and all_gather is None:
        raise ValueError("find_threshold: sharded use (all_reduce) needs all_gather and rank for the per-rank ties")

    def reduce(hist: Tensor) -> Tensor:
        if all_reduce is None:
            return hist
        out = all_reduce(hist)
        return hist if out is None else out

    device = next((t.device for g in groups for t in g), torch.device("cpu"))
    digits = SHARDED_DIGITS if all_reduce is not None else _digit_schedule(device)
    n = len(groups)
    prefix, remaining = torch.zeros(n, dtype=torch.int64), torch.tensor(ks, dtype=torch.int64)
    bucket, prefix_bits, local = torch.zeros(n, dtype=torch.int64), 0, None
    for bits in digits:
        local = torch.stack([topk_histogram(g, use_abs, int(p), prefix_bits, bits) if g else
                             torch.zeros(1 << bits, dtype=torch.int64, device=device) for g, p in zip(groups, prefix)])
        hist = reduce(local.clone()).cpu()
        if prefix_bits == 0:
            for k, total in zip(ks, hist.sum(1).tolist()):
                if k > total:
                    raise ValueError(f"find_threshold: k must be in [0, N] with N = {total}, got {k}")
        bucket, above = _select_buckets(hist, remaining.clamp(min=1))
        prefix, remaining = (prefix << bits) | bucket, remaining - above
        prefix_bits += bits
    if all_gather is not None:
        local_ties = local[torch.arange(n, device=local.device), bucket.to(local.device)].clone()
        earlier = torch.as_tensor(all_gather(local_ties)).reshape(-1, n)[:rank].sum(0).cpu()
        remaining = torch.minimum((remaining - earlier).clamp(min=0), local_ties.cpu())
    # k = 0: no finite value has the largest key (it stands for a NaN)
    return [(0xFFFFFFFF, 0) if k == 0 else (int(p), int(r)) for k, p, r in zip(ks, prefix, remaining)]


# --- topk_masks: the public entry point ---------------------------------------------------

def kept_count(count: int, sparsity: float) -> int:
    """Elements a sparsity keeps out of ``count``: ``count - floor(sparsity * count)``, the product
    taken exactly on the decimal the sparsity is written as (its shortest ``repr``), so that
    ``kept_count(100, 0.29) == 71`` although ``0.29 * 100`` is 28.999... in binary floating point.
    Every sparsebert count (patterns, the pruner's exactness check, topk_masks) comes from here."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"kept_count: sparsity must be in [0, 1], got {sparsity}")
    # Integer arithmetic on the digits of repr (torch.compile traces it; fractions.Fraction it cannot).
    mantissa, _, exponent = repr(float(sparsity)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits, scale = int(whole + fraction), len(fraction) - int(exponent or "0")
    pruned = digits * count // 10**scale if scale >= 0 else digits * 10**-scale * count
    return count - pruned


def _kept(count: int, k: int | None, sparsity: float | None, what: str) -> int:
    """Elements to keep out of ``count``: k itself, or what ``sparsity`` keeps."""
    if k is not None:
        if k < 0 or k > count:
            raise ValueError(f"topk_masks: k must be in [0, N] with N = {count} ({what}), got {k}")
        return k
    return kept_count(count, sparsity)
