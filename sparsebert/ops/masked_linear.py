"""Masked linear layers over bit-packed masks: ``y = x @ (W * M)^T + b``.

``masked_linear`` serves magnitude-style pruning (gradient to W, masked); ``movement_linear``
serves movement pruning, where the learnable scores S get the straight-through gradient
``(grad_out^T x) * W``. Neither keeps ``W * M`` alive between forward and backward: the
backward recomputes the masking inside the fused kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_linear", "movement_linear"]

_ops = torch.ops.sparsebert


def _fake_check(x: Tensor, weight: Tensor) -> None:
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension, got a scalar")
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"x has last dimension {x.shape[-1]}, expected in_features = {weight.shape[1]}")


def _grad_bias(grad_out: Tensor) -> Tensor:
    # flatten, not reshape(-1, out): the latter is ambiguous when out_features is 0.
    return grad_out.flatten(0, -2).sum(0) if grad_out.dim() > 1 else grad_out


# ---------------------------------------------------------------------------------------
# masked_linear


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None, *, weight_is_masked: bool = False) -> Tensor:
    """``x @ (weight * mask)^T + bias`` with a bit-packed ``mask`` of shape ``[out, ceil(in / 8)]``.

    Args:
        x: ``[..., in_features]``, any strides.
        weight: ``[out_features, in_features]``, same dtype and device as ``x``.
        mask: uint8 bit-packed mask over ``weight`` (see ``sparsebert.ops.pack_mask``), any strides
            (the kernels read a contiguous copy of a strided one).
        bias: optional ``[out_features]``.
        weight_is_masked: the caller's promise that ``weight`` is already 0 wherever ``mask``
            is 0 (magnitude pruning, locked patterns); the forward is then a plain dense GEMM.
            With False the result is right for any ``weight``.

    Gradients: ``x`` and ``bias`` as for a dense linear layer with ``weight * mask``; ``weight``
    gets ``(grad_out^T x) * mask``, exactly 0 at pruned positions. ``mask`` gets none.
    """
    return _ops.masked_linear(x, weight, mask.contiguous(), bias, weight_is_masked)


@torch.library.register_fake("sparsebert::masked_linear")
def _(x, weight, mask, bias, weight_is_masked=False):
    _fake_check(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _masked_linear_setup_context(ctx, inputs, output):
    x, weight, mask, bias, weight_is_masked = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.weight_is_masked = weight_is_masked
    ctx.has_bias = bias is not None


def _masked_linear_backward(ctx, grad_out):
    x, weight, mask = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.masked_linear_grad_input(grad_out, weight, mask, ctx.weight_is_masked)
    if ctx.needs_input_grad[1]:
        grad_w = _ops.masked_linear_grad_weight(grad_out, x, mask)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = _grad_bias(grad_out)
    return grad_x, grad_w, None, grad_b, None


torch.library.register_autograd(
    "sparsebert::masked_linear", _masked_linear_backward, setup_context=_masked_linear_setup_context
)


# ---------------------------------------------------------------------------------------
# movement_linear


def movement_linear(x: Tensor, weight: Tensor, scores: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ (weight * mask)^T + bias`` where ``mask`` was chosen from the movement ``scores``.

    The forward equals ``masked_linear(x, weight, mask, bias)`` (``weight`` may be non-zero at
    pruned positions). ``scores`` (shape and dtype of ``weight``) only receives the
    straight-through gradient ``G * weight`` with ``G = grad_out^T x``; ``weight`` receives
    ``G * mask``. Both come from one fused pass over ``G``. Any strides, as for ``masked_linear``.
    """
    return _ops.movement_linear(x, weight, scores, mask.contiguous(), bias)


@torch.library.register_fake("sparsebert::movement_linear")
def _(x, weight, scores, mask, bias):
    _fake_check(x, weight)
    torch._check(scores.shape == weight.shape, lambda: f"scores must have the shape of weight {tuple(weight.shape)}, got {tuple(scores.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _movement_linear_setup_context(ctx, inputs, output):
    x, weight, scores, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _movement_linear_backward(ctx, grad_out):
    x, weight, mask = ctx.saved_tensors
    grad_x = grad_w = grad_s = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.masked_linear_grad_input(grad_out, weight, mask, False)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_w, grad_s = _ops.movement_linear_grad_weight(grad_out, x, weight, mask)
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        grad_s = grad_s if ctx.needs_input_grad[2] else None
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_b = _grad_bias(grad_out)
    return grad_x, grad_w, grad_s, None, grad_b


torch.library.register_autograd(
    "sparsebert::movement_linear", _movement_linear_backward, setup_context=_movement_linear_setup_context
)


# ---------------------------------------------------------------------------------------
# Backward ops (called by the autograd formulas above; no autograd of their own)


@torch.library.register_fake("sparsebert::masked_linear_grad_input")
def _(grad_out, weight, mask, weight_is_masked=False):
    torch._check(grad_out.shape[-1] == weight.shape[0], lambda: f"grad_out has last dimension {grad_out.shape[-1]}, expected out_features = {weight.shape[0]}")
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


@torch.library.register_fake("sparsebert::masked_linear_grad_weight")
def _(grad_out, x, mask):
    return x.new_empty((grad_out.shape[-1], x.shape[-1]))


@torch.library.register_fake("sparsebert::movement_linear_grad_weight")
def _(grad_out, x, weight, mask):
    return weight.new_empty(weight.shape), weight.new_empty(weight.shape)
