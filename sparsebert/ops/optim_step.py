"""Fused, in-place, multi-tensor optimizer steps that keep pruned weights at exactly 0.

Both ops take lists of tensors (one call updates a whole parameter list) and a list of
bit-packed masks, ``None`` for a dense parameter (biases, LayerNorm). At pruned positions the
gradient counts as 0 and the weight is written 0; with dense state the state there is
written 0 too. With ``compact=True`` the state of a masked parameter is 1-D, one entry per
kept weight in row-major order, and pruned positions keep their values (they must already
be 0: MaskedAdamW/MaskedSGD zero them when they compact the state).

Requirements (checked, with an error naming the argument, before anything is written):
equal list lengths; every tensor contiguous and on one device; one parameter dtype per call
(float32/float64 on CPU; also float16/bfloat16 on CUDA, whose state may be float32 or the
parameter dtype); grads of the parameters' shape and dtype; state of the parameter's shape,
or 1-D of length popcount(mask) for a masked parameter in compact mode; masks of shape
``[*shape[:-1], ceil(shape[-1] / 8)]``, uint8. With ``check_finite`` a pre-pass raises on a
NaN/Inf gradient (at kept positions only), naming its index; weights are not checked (see
sparsebert/optim.py). On CUDA, check_finite and compact mode each cost one device-to-host
synchronization, the price of raising before any write. The CPU kernels use AVX-512 where the
CPU has it and torch's ATEN_CPU_CAPABILITY allows it, else portable loops with the same
results bit for bit.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["masked_adamw_", "masked_sgd_"]


def masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    masks: Sequence[Optional[Tensor]],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    compact: bool = False,
    check_finite: bool = True,
) -> None:
    """One ``torch.optim.AdamW`` step over every parameter, in place, respecting the masks.

    ``step`` is the 1-based step number of these parameters (for the bias corrections).
    Decoupled weight decay ``p *= 1 - lr * weight_decay``; ``eps`` is added after the square
    root of the bias-corrected second moment, as in torch.
    """
    torch.ops.sparsebert.masked_adamw_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(masks), int(step), float(lr),
        float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize), bool(compact), bool(check_finite),
    )


def masked_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Optional[Tensor]],
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
    maximize: bool = False,
    compact: bool = False,
    check_finite: bool = True,
) -> None:
    """One ``torch.optim.SGD`` step over every parameter, in place, respecting the masks.

    ``momentum_buffers``: one per parameter when ``momentum != 0``, empty otherwise.
    ``first_step``: the buffers hold nothing yet; like torch, they are set to the (decayed)
    gradient instead of being blended with it.
    """
    torch.ops.sparsebert.masked_sgd_(
        list(params), list(grads), list(momentum_buffers), list(masks), float(lr), float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(first_step), bool(maximize), bool(compact), bool(check_finite),
    )


@torch.library.register_fake("sparsebert::masked_adamw_")
def _masked_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, masks, step, lr, beta1, beta2, eps, weight_decay,
                       maximize, compact, check_finite):
    return None


@torch.library.register_fake("sparsebert::masked_sgd_")
def _masked_sgd_fake(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov,
                     first_step, maximize, compact, check_finite):
    return None
