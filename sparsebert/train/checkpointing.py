"""Checkpoints of a distributed job hold what a single process saves, whatever the world size: DDP
saves the unwrapped model from rank 0; FSDP2 gathers the full model state
(torch.distributed.checkpoint.state_dict, full_state_dict) and the optimizer's shards (compact
MaskedAdamW state included) for rank 0 to write, and cuts a saved full state back into shards on
resume. Each rank's RNG state rides along for an exact resume at the same world size."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as D
from .distributed import current

class _Held:
    """What Run.save_checkpoint / load_checkpoint take for a model or optimizer: a state dict already
    gathered, or a way to load one."""

    def __init__(self, state: dict | None = None, load: Callable[[dict], Any] | None = None):
        self._state, self._load = state, load

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict, strict: bool = True):
        return self._load(state)


def _fsdp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)


def for_checkpoint(model: nn.Module, optimizer) -> tuple[Any, Any, list]:
    """(model, optimizer, per-rank RNG) to save: under FSDP2 the full (gathered) states, the same files
    a single process writes, so that a run resumes at any world size. Every rank calls it."""
    d = current()
    if d.mode != "fsdp":
        return D.unwrap(model), optimizer, _rank_rng()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return _Held(get_model_state_dict(model, options=_fsdp_options())), _Held(_full_optimizer_state(optimizer)), _rank_rng()


def for_restore(model: nn.Module, optimizer) -> tuple[Any, Any]:
    """(model, optimizer) that load a saved (full) state into this rank's (wrapped, sharded) objects."""
    if current().mode != "fsdp":
        return D.unwrap(model), optimizer
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    return (_Held(load=lambda sd: set_model_state_dict(model, sd, options=_fsdp_options())),
            _Held(load=lambda sd: optimizer.load_state_dict(_shard_optimizer_state(optimizer, sd))))


def _params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _cat_shards(piece: torch.Tensor, group) -> torch.Tensor:
    """Every rank's 1-D `piece` (any lengths), concatenated in rank order."""
    sizes = D.all_gather(torch.tensor([piece.numel()], device=piece.device), group).flatten().tolist()
    padded = piece.new_zeros(max(sizes))
    padded[:piece.numel()] = piece
    gathered = D.all_gather(padded, group)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


def _full_optimizer_state(optimizer) -> dict:
    """The optimizer state dict with every shard gathered: DTensor moments in full, and the compact
    state of a sharded parameter (its shard's kept weights, row-major) concatenated in rank order,
    which is the whole weight's compact state."""
    sd = optimizer.state_dict()
    params = _params(optimizer)
    state = {}
    for pid, st in sd["state"].items():
        param, out = params[pid], {}
        for name, value in st.items():
            if D.is_sharded(value):
                value = D.full_tensor(value)
            elif D.is_sharded(param) and isinstance(value, torch.Tensor) and name not in ("step", "compact_mask"):
                value = _cat_shards(value, D.shard_group(param))
            out[name] = value.cpu() if isinstance(value, torch.Tensor) else value
        state[pid] = out
    return {"state": state, "param_groups": sd["param_groups"]}


def _shard_optimizer_state(optimizer, full: dict) -> dict:
    """A full optimizer state dict cut to this rank's shards (the inverse of _full_optimizer_state)."""
    from ..ops import mask_nnz
    params = _params(optimizer)
    state = {}
    for pid, st in full["state"].items():
        param, out = params[int(pid)], {}
        for name, value in st.items():
            if D.is_sharded(param) and isinstance(value, torch.Tensor) and name not in ("step", "compact_mask"):
                rows = D.row_slice(param)
                if tuple(value.shape) == tuple(param.shape):
                    value = D.shard_rows_like(value[rows].to(D.local(param).device), param)
                else:  # compact: this shard's kept weights follow those of the rows before it
                    mask = st["compact_mask"]
                    start = mask_nnz(mask[:rows.start])
                    value = value[start:start + mask_nnz(mask[rows])]
            out[name] = value
        state[pid] = out
    return {"state": state, "param_groups": full["param_groups"]}


def _rank_rng() -> list:
    """Every rank's torch RNG state (dropout draws from it), for an exact resume at the same world size."""
    if not current().active:
        return []
    mine = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state().tolist()
    states: list = [None] * current().world
    dist.all_gather_object(states, mine)
    return states


def restore_rank_rng(states: list | None) -> None:
    """After a checkpoint restored rank 0's RNG on every rank: this rank's own, when the world size is
    the saved one (at another world size the ranks' dropout streams cannot be the same anyway)."""
    if states and len(states) == current().world and current().active:
        mine = states[current().rank]
        torch.set_rng_state(torch.tensor(mine["cpu"], dtype=torch.uint8))
        if "cuda" in mine:
            torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8))


def plain_copy(model: nn.Module) -> nn.Module | None:
    """The trained student as one plain module on rank 0 (None elsewhere): the unwrapped model, or
    under FSDP2 a new instance of its class loaded with the gathered full state (every rank gathers)."""
    d = current()
    if d.mode != "fsdp":
        return D.unwrap(model) if d.is_main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    from ..sparsity import enable_qat, masked_modules, sparsify
    full = get_model_state_dict(model, options=_fsdp_options())
    if not d.is_main:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    plain = cls(model.config)
    if hasattr(model, "sparsebert_config"):
        modules = sparsify(plain, model.sparsebert_config)
        for name, module in masked_modules(model).items():
            if module.quantizer is not None:
                enable_qat({name: modules[name]}, module.quantizer.bits)
            modules[name].weight_is_masked = module.weight_is_masked
    plain.load_state_dict(full)
    return plain.train(model.training)
