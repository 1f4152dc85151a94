"""MaskedAdamW and MaskedSGD: ``torch.optim`` optimizers over the fused masked steps.

Masks are bit-packed uint8 tensors (``sparsebert.ops.pack_mask``), held BY REFERENCE: the
optimizer keeps the very tensor a MaskedLinear module owns and a pruner updates in place, so
the dense-state optimizer always steps with the current mask. Give them per parameter group
(``{"params": [...], "masks": [mask or None per param]}``), as ``masks={param: mask}``, or
later with :meth:`set_mask`. Pruned weights are written 0 at every step and never revived.

State modes:

* dense state (default): moments shaped like the parameter, written 0 at pruned positions;
  masks may change between steps (pruning schedules).
* ``compact=True``: the state of a masked parameter is 1-D, one entry per kept weight in
  row-major order (10% of the memory at 90% sparsity), numerically the same as AdamW/SGD over
  the kept weights alone. It needs a locked mask: a masked parameter is compacted at its first
  step, for the mask of that moment (pruned weights are then zeroed once, also without state,
  as for MaskedSGD without momentum; the step itself never writes them). The state holds a
  copy of the mask it was compacted for (1/32 of the weights' bytes): a step raises
  :class:`MaskChanged` when the mask differs from it in any bit (the same number of kept
  weights included), before anything is written; to change the mask on purpose, call
  :meth:`compact_state_` (kept positions keep their state, new ones start at 0).

``check_finite=True`` (default) makes a step raise, before anything is written, if a gradient
holds NaN/Inf at a kept position; it costs one extra read of the gradients (on CPU, of the
cache lines that hold a kept one). On CPU it also copies the kept gradients of sparse parts of
masked parameters (at most a quarter kept) to a workspace that the update reads instead of the
gradients: about the kept gradients' bytes, held per calling thread and reused across steps
(34 MB for BERT-base's encoder at 90% sparsity). Weights are not checked: the update cannot
make them non-finite from finite gradients and finite state, and a second read of the weights
would cost as much again.

A group's ``lr_scale`` (default 1) multiplies its ``lr`` inside every step, so a loop that sets
every group's ``lr`` to one scheduled value (or a LambdaLR) keeps the groups' ratios.

FSDP2 parameters (DTensors sharded on their rows) are stepped shard by shard, with the rows of their
(replicated) masks that the shard holds: dense state is a DTensor sharded like its parameter, compact
state the local shard's kept weights in row-major order.

Half/bfloat16 parameters (CUDA) keep float32 state. One kernel call covers all parameters of a
group that share device, dtype and step. Non-contiguous parameters and masks (which torch.optim
accepts) step through contiguous copies, written back.

Keepers of pruned zeros (:mod:`sparsebert.zeros`): a step with the keeper's mask renews its
promise; an import-time post-step hook re-zeroes pruned weights that any other optimizer stepped,
with one :class:`~sparsebert.zeros.UnmaskedOptimizerWarning` per optimizer.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, register_optimizer_step_post_hook

from . import zeros
from .distributed import local, local_rows
from .ops.mask import masks_equal, unpack_mask
from .ops.optim_step import masked_adamw_, masked_sgd_

__all__ = ["MaskChanged", "MaskedAdamW", "MaskedOptimizer", "MaskedSGD"]


class MaskChanged(RuntimeError):
    """A compact-state step found a mask that is not the one its state was compacted for."""


def _state_dtype(param: Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


def _keep(mask: Tensor, param: Tensor) -> Tensor:
    """The kept positions of `param`'s local shard (all of it unless it is an FSDP2 DTensor)."""
    return unpack_mask(local_rows(mask, param), param.shape[-1])


class MaskedOptimizer(Optimizer):
    """What MaskedAdamW and MaskedSGD share: masks, lazy (compact) state, state_dict."""

    #: the names of the per-parameter state tensors
    _state_names: tuple[str, ...] = ()

    def __init__(self, params: ParamsT, defaults: dict, masks: Optional[dict] = None):
        self._masks: dict[Tensor, Tensor] = {}
        super().__init__(params, defaults)
        for param, mask in (masks or {}).items():
            self.set_mask(param, mask)

    # -- masks ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        masks = None
        if isinstance(param_group, dict) and "masks" in param_group:
            param_group = dict(param_group)
            masks = list(param_group.pop("masks"))
        super().add_param_group(param_group)
        if masks is not None:
            params = self.param_groups[-1]["params"]
            if len(masks) != len(params):
                raise ValueError(f"{type(self).__name__}: a param group has {len(params)} params but {len(masks)} masks")
            for param, mask in zip(params, masks):
                if mask is not None:
                    self.set_mask(param, mask)

    def set_mask(self, param: Tensor, mask: Optional[Tensor]) -> None:
        """Mask `param` with the packed `mask` (held by reference), or make it dense (None)."""
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError(f"{type(self).__name__}.set_mask: the parameter is not optimized by this optimizer")
        if mask is None:
            self._masks.pop(param, None)
            return
        expected = (*param.shape[:-1], (param.shape[-1] + 7) // 8) if param.dim() else None
        if mask.dtype != torch.uint8 or expected is None or tuple(mask.shape) != expected:
            raise ValueError(f"{type(self).__name__}.set_mask: expected a packed uint8 mask of shape {expected} "
                             f"for a parameter of shape {tuple(param.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        if mask.device != param.device:
            raise ValueError(f"{type(self).__name__}.set_mask: mask on {mask.device}, parameter on {param.device}")
        self._masks[param] = mask

    def mask_of(self, param: Tensor) -> Optional[Tensor]:
        """The packed mask `param` steps with (the tensor given, by reference), or None."""
        return self._masks.get(param)

    # -- state -----------------------------------------------------------------------------
    def _group_of(self, param: Tensor) -> dict:
        for group in self.param_groups:
            if any(param is p for p in group["params"]):
                return group
        raise ValueError(f"{type(self).__name__}: the parameter is not optimized by this optimizer")

    def _has_state_tensors(self, group: dict) -> bool:
        return True

    def _new_state(self, param: Tensor, compact: bool) -> dict[str, Tensor]:
        mask = self._masks.get(param)
        if compact and mask is not None:
            shape = (int(_keep(mask, param).sum()),)
            return {name: torch.zeros(shape, dtype=_state_dtype(param), device=param.device) for name in self._state_names}
        # Contiguous whatever the parameter's strides: the kernels step state in place, flat.
        return {name: torch.zeros_like(param, dtype=_state_dtype(param), memory_format=torch.contiguous_format)
                for name in self._state_names}

    def _check_mode(self, param: Tensor, state: dict, compact: bool) -> None:
        has_tensors = any(name in state for name in self._state_names)
        if not has_tensors or param not in self._masks:
            return
        if compact and "compact_mask" not in state:
            raise RuntimeError(f"{type(self).__name__}: the param group is compact but a masked parameter has dense "
                               "state; call compact_state_(param) to convert it")
        if not compact and "compact_mask" in state:
            raise RuntimeError(f"{type(self).__name__}: the param group has dense state but a masked parameter has "
                               "compact state (loaded from a compact optimizer?)")

    @torch.no_grad()
    def compact_state_(self, params: Optional[Iterable[Tensor]] = None) -> None:
        """(Re)build the compact state of masked parameters for their current masks, on purpose.

        Entries of weights kept by both the old and the new mask move to their new index; newly
        kept weights start with zero state; pruned weights are zeroed. Converts dense state too.
        Without `params`: every masked parameter of a compact group.
        """
        if params is None:
            params = [p for g in self.param_groups if g["compact"] for p in g["params"] if p in self._masks]
        for param in params:
            mask = self._masks.get(param)
            if mask is None:
                raise ValueError(f"{type(self).__name__}.compact_state_: the parameter has no mask")
            state = self.state[param]
            keep = _keep(mask, param)
            old = state.get("compact_mask")
            old_keep = _keep(old, param) if old is not None else None
            for name in self._state_names:
                if name not in state:
                    continue
                value = local(state[name])
                if old_keep is not None:
                    dense = torch.zeros(keep.shape, dtype=value.dtype, device=value.device)
                    dense[old_keep] = value
                    value = dense
                state[name] = value[keep].contiguous()
            state["compact_mask"] = mask.clone()
            local(param).mul_(keep)
            for keeper in zeros.keepers(param):
                if keeper.mask is mask:
                    keeper.renew_zeros()

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (moments, step counters, compact-mask copies)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, Tensor))

    # -- stepping ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                self._check_mode(param, state, group["compact"])
                key = (param.device, param.dtype, self._bucket_key(param, state, group))
                buckets.setdefault(key, []).append(param)
            for (_, _, key), params in buckets.items():
                self._step_bucket(group, params, key)
        return loss

    def _bucket_key(self, param: Tensor, state: dict, group: dict):
        return int(state["step"].item())

    def _run(self, group: dict, params: list[Tensor], kernel: Callable[..., None], *args) -> None:
        """Run `kernel` with masks, grads and the state lists; lazily created (compact) state is
        stored, freshly compacted weights zeroed and the zero keepers renewed, only once the kernel
        succeeded. Non-contiguous parameters and masks step through contiguous copies."""
        compact = group["compact"]
        masks = [self._masks.get(p) for p in params]
        fresh: dict[Tensor, dict[str, Tensor]] = {}
        states = []
        for param in params:
            state = self.state[param]
            if self._has_state_tensors(group) and not all(name in state for name in self._state_names):
                fresh[param] = self._new_state(param, compact)
            states.append({**state, **fresh.get(param, {})})
        # Compaction (state, or only the zeroing when there is no state) happens at a masked parameter's first step.
        compacting = [compact and mask is not None and "compact_mask" not in state for mask, state in zip(masks, states)]
        if compact:
            for i, (mask, state) in enumerate(zip(masks, states)):
                if mask is not None and "compact_mask" in state and not masks_equal(mask, state["compact_mask"]):
                    raise MaskChanged(f"{type(self).__name__}: the mask of parameter {i} of a step changed after its state "
                                      "was compacted; a compact-state optimizer needs locked masks: call "
                                      "optimizer.compact_state_(param) after changing a mask on purpose")
        # A compact step does not write pruned weights: their zeros hold after it only if they held before.
        renew = [[k for k in zeros.keepers(p) if k.mask is m and (not compact or fresh_zero or k.zeros_hold())]
                 if m is not None else [] for p, m, fresh_zero in zip(params, masks, compacting)]
        lists = [[local(s[name]) for s in states] for name in self._state_names] if self._has_state_tensors(group) else [[]]
        shards = [local(p) for p in params]
        work = [p if p.is_contiguous() else p.contiguous() for p in shards]
        grads = [local(p.grad).contiguous() for p in params]
        kernel(work, grads, *lists, [m if m is None else local_rows(m, p).contiguous() for m, p in zip(masks, params)],
               *args, compact=compact, check_finite=group["check_finite"])
        for shard, copy in zip(shards, work):
            if copy is not shard:
                shard.copy_(copy)
        for param, new in fresh.items():
            self.state[param].update(new)
        for param, mask, fresh_zero in zip(params, masks, compacting):
            if fresh_zero:
                self.state[param]["compact_mask"] = mask.clone()
                local(param).mul_(_keep(mask, param))
        for param, keepers in zip(params, renew):
            self.state[param]["step"] += 1
            for keeper in keepers:
                keeper.renew_zeros()

    def _step_bucket(self, group: dict, params: list[Tensor], key) -> None:
        raise NotImplementedError

    # -- state_dict ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but keeps the saved dtypes (float32 state of half parameters, uint8
        compact masks) and copies the tensors. Masks are not part of the state: they belong to
        the model, and this optimizer keeps the ones it was given."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, saved in saved_state.items():
            param = by_id[pid]
            self.state[param] = {
                name: (value.detach().clone() if name == "step" else value.detach().to(param.device, copy=True))
                if isinstance(value, Tensor) else value
                for name, value in saved.items()
            }


class MaskedAdamW(MaskedOptimizer):
    """torch.optim.AdamW over masked parameters, one fused kernel per step (see module doc)."""

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, masks: Optional[dict] = None, compact: bool = False,
                 maximize: bool = False, check_finite: bool = True):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, compact=compact,
                        maximize=maximize, check_finite=check_finite, lr_scale=1.0)
        super().__init__(params, defaults, masks)

    def _step_bucket(self, group: dict, params: list[Tensor], step: int) -> None:
        beta1, beta2 = group["betas"]
        self._run(group, params, masked_adamw_, step + 1, group["lr"] * group["lr_scale"], beta1, beta2, group["eps"],
                  group["weight_decay"], group["maximize"])


class MaskedSGD(MaskedOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, weight decay) over masked parameters."""

    _state_names = ("momentum_buffer",)

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, masks: Optional[dict] = None,
                 compact: bool = False, maximize: bool = False, check_finite: bool = True):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        compact=compact, maximize=maximize, check_finite=check_finite, lr_scale=1.0)
        super().__init__(params, defaults, masks)

    def _has_state_tensors(self, group: dict) -> bool:
        return group["momentum"] != 0

    def _bucket_key(self, param: Tensor, state: dict, group: dict):
        return "momentum_buffer" not in state  # first step of the momentum buffer

    def _step_bucket(self, group: dict, params: list[Tensor], first_step: bool) -> None:
        self._run(group, params, masked_sgd_, group["lr"] * group["lr_scale"], group["momentum"], group["dampening"],
                  group["weight_decay"], group["nesterov"], first_step, group["maximize"])


def _after_any_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Global post-step hook of every torch optimizer: re-zero the pruned weights it stepped without
    their masks, and say so once per optimizer (see sparsebert.zeros)."""
    if isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        return  # a wrapper (accelerate's AcceleratedOptimizer): the inner optimizer's step is hooked itself
    mask_of = optimizer.mask_of if isinstance(optimizer, MaskedOptimizer) else None
    rezeroed = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            for keeper in zeros.keepers(param):
                if mask_of is not None and mask_of(param) is keeper.mask:
                    continue  # stepped with the mask: the step renewed the keeper itself
                if param.grad is None and keeper.zeros_hold():
                    continue  # not stepped
                keeper.rezero_()
                rezeroed += 1
    if rezeroed and not getattr(optimizer, "_sparsebert_warned", False):
        optimizer._sparsebert_warned = True
        warnings.warn(
            f"{type(optimizer).__name__} stepped {rezeroed} pruned weight matrices without their sparsebert masks: "
            "sparsebert re-zeroes their pruned weights after every step of it (an extra pass over the weights; "
            "the optimizer keeps state for pruned weights). Use sparsebert.optim.MaskedAdamW (or MaskedSGD) with "
            "the masks, which sparsebert.Pruning.prepare() builds, to keep them at 0 inside the step.",
            zeros.UnmaskedOptimizerWarning, stacklevel=3)


_STEP_HOOK = register_optimizer_step_post_hook(_after_any_step)
