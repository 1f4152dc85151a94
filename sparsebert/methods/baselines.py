"""Baselines the papers compare with: one-shot magnitude, gradual magnitude, and a small dense model."""
from __future__ import annotations

import math

from torch import nn

from ..distributed import is_ddp
from ..families import family_of
from ..objectives import TASK_OBJECTIVES
from .base import Method, register_method
from .sparse import SparseMethod


@register_method
class OneShotMagnitude(SparseMethod):
    """Prune once before fine-tuning (per-matrix magnitude), then fine-tune with the mask locked."""
    name = "oneshot-magnitude"
    defaults = {"schedule": "one-shot", "criterion": "magnitude", "pattern": "tensor"}


@register_method
class GradualMagnitude(SparseMethod):
    """Zhu & Gupta gradual magnitude pruning during fine-tuning, task loss only (no teacher)."""
    name = "gradual-magnitude"
    defaults = {"schedule": "cubic", "criterion": "magnitude", "pattern": "tensor", "begin_frac": 0.0, "end_frac": 0.6, "events": 100}


def layers_for_sparsity(num_layers: int, sparsity: float) -> int:
    """Layers of a dense model whose encoder non-zeros match `sparsity` of the full encoder."""
    return max(1, round(num_layers * (1.0 - sparsity)))


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the encoder layers at these indices (in place), updating the config."""
    family = family_of(model)
    layers = family.layer_list(model)
    kept = nn.ModuleList([layers[i] for i in keep])
    family.set_layer_list(model, kept)
    for i, layer in enumerate(kept):
        for sub in layer.modules():  # attention modules that know their position (transformers >= 4.48)
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    model.config.num_hidden_layers = len(keep)  # DistilBERT's config maps it to n_layers
    return model


def small_dense(model: nn.Module, *, sparsity: float | None = None, num_layers: int | None = None) -> nn.Module:
    """A shallower dense student built from the pre-trained model by keeping every k-th layer (the last
    one included), with as many layers as match `sparsity` (or `num_layers`). In place; returns model."""
    total = len(family_of(model).layer_list(model))
    n = num_layers if num_layers is not None else layers_for_sparsity(total, sparsity)
    if not 1 <= n <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {n}")
    step = total / n
    keep = sorted({min(total - 1, math.ceil((i + 1) * step) - 1) for i in range(n)})
    return keep_layers(model, keep)


@register_method
class SmallDense(Method):
    """Fine-tune a dense student with fewer layers whose encoder non-zeros match the target sparsity."""
    name = "small-dense"
    objectives = TASK_OBJECTIVES

    def __init__(self, warmup_ratio: float = 0.1, sparsity: float = 0.9, num_layers: int | None = None):
        super().__init__(warmup_ratio=warmup_ratio)
        self.sparsity, self.num_layers = sparsity, num_layers

    def adapt(self, model: nn.Module) -> None:
        """Drop layers, once: a model already made small keeps its layers."""
        if is_ddp(model):
            raise ValueError("small-dense removes layers of the student, which its DistributedDataParallel wrapper "
                             "would still expect: set the method up on the unwrapped model and wrap it afterwards")
        if not getattr(model, "sparsebert_small_dense", False):
            small_dense(model, sparsity=self.sparsity, num_layers=self.num_layers)
            model.sparsebert_small_dense = True
