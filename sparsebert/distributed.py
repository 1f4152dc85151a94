"""torch.distributed support of the library, for the trainer and for users' own DDP / FSDP2 loops.

* `global_batch(rows)`: inside it, sparsebert's losses are means over the *global* batch of a
  data-parallel step (every rank's rows), not over this rank's rows: DDP and FSDP2 average the
  gradients over ranks, so a loss of `sum * world / global count` gives the gradient of the
  single-process run at the global batch, also when ranks hold different numbers of tokens (masked
  LM, distillation over real tokens) or examples. `gather_rows` gives every rank the global batch's
  rows of a tensor (CAP's memory banks).
* DTensor parameters (FSDP2 `fully_shard`: sharded on dim 0 over a 1-D mesh): `local`, `row_slice`,
  `local_rows` map a replicated tensor (a mask) onto a rank's shard.
* `check_same_on_ranks`: a cheap all-gathered digest of the masks after a pruning event; ranks that
  disagree stop with `MasksDiffer`.
* `CommLog`: the bytes the pruner's collectives move (reported with its sharded events).

Everything is a no-op in a single process (no process group, or a group of one).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["MasksDiffer", "world_size", "rank", "is_ddp", "unwrap", "global_batch", "mean_over", "max_over_ranks", "gather_rows", "is_sharded",
           "local", "row_slice", "local_rows", "shard_group", "shard_rows_like", "full_tensor", "full_tensors", "check_same_on_ranks", "CommLog",
           "comm_log", "comm_device", "all_reduce", "all_gather"]


class MasksDiffer(RuntimeError):
    """Ranks hold different masks after a pruning event."""


def _active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if _active(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if _active(group) else 0


# ---- communication, counted ----------------------------------------------------------------------

@dataclasses.dataclass
class CommLog:
    """Bytes each rank receives in the collectives run inside `comm_log()` (ring algorithms: an
    all-reduce of S bytes moves 2 (W-1)/W S, an all-gather of S bytes in all (W-1)/W S), and calls."""
    bytes: float = 0.0
    calls: int = 0


_LOGS: list[CommLog] = []


@contextlib.contextmanager
def comm_log() -> Iterator[CommLog]:
    log = CommLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(nbytes: float) -> None:
    for log in _LOGS:
        log.bytes += nbytes
        log.calls += 1


def all_reduce(t: Tensor, group=None, op=None) -> Tensor:
    """In-place all-reduce (sum by default) over `group`, counted in the active CommLogs."""
    w = world_size(group)
    if w > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
        _record(2 * (w - 1) / w * t.numel() * t.element_size())
    return t


def all_gather(t: Tensor, group=None) -> Tensor:
    """Every rank's `t`, stacked: [world, *t.shape]; counted in the active CommLogs."""
    w = world_size(group)
    if w == 1:
        return t.unsqueeze(0)
    out = t.new_empty(w * t.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, t.contiguous().reshape(-1), group=group)
    _record((w - 1) * t.numel() * t.element_size())
    return out.view(w, *t.shape)


# ---- the global batch of a data-parallel step ------------------------------------------------------

@dataclasses.dataclass
class _GlobalBatch:
    group: object
    sizes: list[int]  # rows of every rank, in rank order


_BATCH: list[_GlobalBatch] = []


@contextlib.contextmanager
def global_batch(rows: int, group=None, sizes: Sequence[int] | None = None) -> Iterator[None]:
    """Make sparsebert's losses means over the global batch of a data-parallel step, of which this
    rank holds `rows` rows (`sizes`: every rank's, when known, saves an all-gather). Every rank must
    compute the same loss terms in the same order inside it (they exchange their counts)."""
    if not _active(group):
        yield
        return
    if sizes is None:
        sizes = all_gather(torch.tensor([rows], device=comm_device(group)), group).flatten().tolist()
    if len(sizes) != world_size(group) or sizes[rank(group)] != rows:
        raise ValueError(f"global_batch: sizes {list(sizes)} do not match {world_size(group)} ranks with {rows} rows here")
    _BATCH.append(_GlobalBatch(group, [int(s) for s in sizes]))
    try:
        yield
    finally:
        _BATCH.pop()


def comm_device(group=None) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")


def mean_over(total: Tensor, count: Tensor | int | float) -> Tensor:
    """`total / count` for a loss summed over this rank's `count` items; inside `global_batch`,
    `total * world / (count summed over ranks)`, whose gradient averaged over ranks is the global
    batch's mean. A count of 0 (nothing to average anywhere) gives 0."""
    count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
    if _BATCH:
        ctx = _BATCH[-1]
        count = all_reduce(count.clone().to(comm_device(ctx.group)), ctx.group).to(total.device)
        return total * (world_size(ctx.group) / count.clamp(min=1)).to(total.dtype)
    return total / count.clamp(min=1).to(total.dtype)


def max_over_ranks(t: Tensor) -> Tensor:
    """Inside `global_batch`: the maximum of `t` over the ranks (so a statistic of the global batch,
    such as QAT's input range, is the same on every rank); outside: `t`."""
    if not _BATCH:
        return t
    group = _BATCH[-1].group
    return all_reduce(t.clone().to(comm_device(group)), group, dist.ReduceOp.MAX).to(t.device)


def gather_rows(t: Tensor) -> Tensor:
    """Inside `global_batch`: every rank's rows of `t` (dim 0), in rank order, so the global batch's;
    outside: `t`. No gradient flows through the gathered rows."""
    if not _BATCH:
        return t
    ctx = _BATCH[-1]
    rows = max(ctx.sizes)
    t = t.detach()
    padded = t.new_zeros((rows, *t.shape[1:]))
    padded[:t.shape[0]] = t
    device = comm_device(ctx.group)
    gathered = all_gather(padded.to(device), ctx.group).to(t.device)
    return torch.cat([gathered[r, :n] for r, n in enumerate(ctx.sizes)])


# ---- wrapped models ------------------------------------------------------------------------------

def is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (its config, modules, parameter names), or
    the model itself (FSDP2's fully_shard keeps the model's class and attributes)."""
    return model.module if is_ddp(model) else model


# ---- DTensor shards (FSDP2) ----------------------------------------------------------------------

def _dtensor_type():
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(t) -> bool:
    return dist.is_available() and isinstance(t, _dtensor_type())


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place writes reach the DTensor), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def _check_row_sharded(t) -> None:
    from torch.distributed.tensor import Shard
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(f"sparsebert supports DTensors sharded on dim 0 over a 1-D mesh (FSDP2 fully_shard), got "
                         f"placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh")


def shard_group(t):
    """The process group a DTensor is sharded over."""
    _check_row_sharded(t)
    return t.device_mesh.get_group()


def row_slice(t) -> slice:
    """The rows of the global tensor this rank's shard holds (torch.chunk layout, as FSDP2 shards)."""
    if not is_sharded(t):
        return slice(0, t.shape[0] if t.dim() else 0)
    _check_row_sharded(t)
    rows, w, r = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-rows // w)
    start = min(rows, r * chunk)
    stop = min(rows, start + chunk)
    if t.to_local().shape[0] != stop - start:
        raise ValueError(f"DTensor shard of {t.to_local().shape[0]} rows, expected rows [{start}, {stop}) of {rows}")
    return slice(start, stop)


def local_rows(full: Tensor, like) -> Tensor:
    """The rows of `full` (a replicated tensor with the rows of `like`, e.g. its packed mask) that
    match this rank's shard of `like`; `full` itself when `like` is not sharded."""
    return full[row_slice(like)] if is_sharded(like) else full


def shard_rows_like(piece: Tensor, like) -> Tensor:
    """A DTensor sharded like `like` whose shard here is `piece`: this rank's rows of a (contiguous)
    tensor with `like`'s rows, e.g. the packed mask rows of a sharded weight."""
    from torch.distributed.tensor import DTensor
    shape = torch.Size((like.shape[0], *piece.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride)


def full_tensor(t) -> Tensor:
    """The whole tensor of a DTensor (an all-gather, counted), or `t` itself."""
    return full_tensors([t])[0]


def full_tensors(ts: Sequence) -> list[Tensor]:
    """`full_tensor` of each; the DTensors (one dtype, one group) in a single all-gather."""
    sharded = [t for t in ts if is_sharded(t)]
    if not sharded:
        return list(ts)
    group = shard_group(sharded[0])
    w = world_size(group)
    pieces = []
    for t in sharded:
        piece = local(t)
        padded = piece.new_zeros((-(-t.shape[0] // w), *piece.shape[1:]))  # torch.chunk rows: equal on every rank
        padded[:piece.shape[0]] = piece
        pieces.append(padded.reshape(-1))
    gathered = all_gather(torch.cat(pieces), group)
    out, start = {}, 0
    for t, piece in zip(sharded, pieces):
        block = gathered[:, start:start + piece.numel()].reshape(w * -(-t.shape[0] // w), *t.shape[1:])
        out[id(t)] = block[:t.shape[0]]
        start += piece.numel()
    return [out[id(t)] if is_sharded(t) else t for t in ts]


# ---- masks agree on every rank -------------------------------------------------------------------

def _digest(mask: Tensor) -> Tensor:
    """Two position-weighted sums of a mask's bytes: any one changed byte changes both."""
    b = mask.reshape(-1).to(torch.int64)
    i = torch.arange(b.numel(), device=b.device)
    return torch.stack([(b * (i % 65521 + 1)).sum(), (b * ((i * 7919) % 65519 + 1)).sum()])


def check_same_on_ranks(masks: Sequence[Tensor], names: Sequence[str], group=None, when: str = "") -> None:
    """Raise MasksDiffer unless every rank holds the same `masks` (replicated packed masks); one
    all-gather of two int64 per mask."""
    if not _active(group) or not masks:
        return
    device = comm_device(group)
    digests = torch.stack([_digest(m) for m in masks]).to(device)
    every = all_gather(digests, group).cpu()
    bad = sorted({(r, i) for r in range(every.shape[0]) for i in range(len(masks)) if not torch.equal(every[r, i], every[0, i])})
    if bad:
        ranks = sorted({r for r, _ in bad})
        first = names[bad[0][1]]
        raise MasksDiffer(f"masks differ between ranks{' ' + when if when else ''}: rank(s) {ranks} disagree with rank 0 "
                          f"on {len({i for _, i in bad})} of {len(masks)} matrices (first: {first}). Every rank must "
                          "rank the same weights/scores: parameters added after wrapping in DDP are not synchronized, "
                          "and every rank must call the pruner")
