"""The contract between a pruning method and the trainer (see docs/ARCHITECTURE.md).

The trainer owns data, the loop, evaluation, checkpoints and the report; a method owns what is
pruned, how, and the loss. Methods register by name and are built from a recipe's `method:` fields.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..objectives import OBJECTIVES, model_inputs, task_loss
from ..registry import Registry
from ..sparsity.schedules import linear_warmup_decay

@dataclasses.dataclass
class MethodContext:
    """What a method trains on: the student (trained, sparsified in place by setup), the frozen teacher
    and pre-trained encoder it may learn from, the objective, and the run's sizes (docs/ARCHITECTURE.md)."""

    student: nn.Module
    teacher: nn.Module | None
    pretrained: nn.Module | None
    objective: str
    num_labels: int
    total_steps: int
    steps_per_epoch: int
    train_size: int
    device: torch.device

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")


METHODS: Registry[type["Method"]] = Registry("method")


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: register a Method subclass under its `name`."""
    return METHODS.register(cls.name)(cls)


def get_method(name: str, **config: Any) -> "Method":
    """The method registered as `name`, built from its options; NotRegistered for an unknown name."""
    return METHODS.get(name)(**config)


class Method:
    """Base method: dense training with the task loss, AdamW, linear warm-up then linear decay."""

    name: ClassVar[str]
    #: The objectives this method can train; setup() refuses the others.
    objectives: ClassVar[tuple[str, ...]] = OBJECTIVES

    def __init__(self, warmup_ratio: float = 0.1):
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.warmup_ratio = warmup_ratio
        self.ctx: MethodContext | None = None

    def needs(self) -> frozenset[str]:
        """The context's optional models ("teacher", "pretrained") this configuration trains against,
        so a caller can refuse a missing one before it loads anything."""
        return frozenset()

    def adapt(self, model: nn.Module) -> None:
        """Give the student the architecture this method trains (MaskedLinear modules, fewer layers), in
        place and idempotently. setup() calls it; a caller that loads a checkpoint of this method's
        student into a freshly loaded model calls it first, so that masks and scores have a place."""

    def setup(self, ctx: MethodContext) -> None:
        """Check the context (objective, models) and prepare the student for training."""
        if ctx.objective not in self.objectives:
            raise ValueError(f"method {self.name!r} cannot train objective {ctx.objective!r}; it trains {', '.join(self.objectives)}")
        missing = sorted(role for role in self.needs() if getattr(ctx, role) is None)
        if missing:
            raise ValueError(f"method {self.name!r} trains against the {' and '.join(missing)} model: the context has none")
        self.ctx = ctx
        self.adapt(ctx.student)

    def optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """The optimizer this method trains with, over the student's parameters (after setup())."""
        return torch.optim.AdamW(self._param_groups(weight_decay), lr=lr)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Let the method see the gradients of every step of `optimizer` (an optimizer it did not build,
        after setup()): a criterion with gradient statistics reads them. optimizer() watches its own."""

    def optimizer_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """{weight: packed mask} whose pruned weights an optimizer must keep at 0 (after setup())."""
        return {}

    def added_param_groups(self) -> list[dict]:
        """Param groups for the parameters setup() added to the student (movement scores), with their own
        absolute "lr" and "weight_decay": what an optimizer built before setup() lacks."""
        return []

    def _param_groups(self, weight_decay: float, lr_scales: Sequence[tuple[re.Pattern, float]] = ()) -> list[dict]:
        """BERT convention: no weight decay on biases and LayerNorm weights. Groups by (decayed?, LR
        scale), the scale from the first matching regex of `lr_scales`; the two scale-1 groups always
        exist, decayed first. Movement scores (`*.scores`) are left to the sparse methods' own group."""
        groups = {(True, 1.0): {"params": [], "weight_decay": weight_decay, "lr_scale": 1.0},
                  (False, 1.0): {"params": [], "weight_decay": 0.0, "lr_scale": 1.0}}
        for name, param in self.ctx.student.named_parameters():
            if not param.requires_grad or name.endswith(".scores"):
                continue
            decay = param.dim() >= 2
            scale = next((s for pattern, s in lr_scales if pattern.search(name)), 1.0)
            groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                               "lr_scale": scale})["params"].append(param)
        return list(groups.values())

    def lr_at(self, step: int, base_lr: float) -> float:
        """The LR of `step` for a base LR: linear warm-up over warmup_ratio of the run, then linear decay."""
        total = self.ctx.total_steps
        return base_lr * linear_warmup_decay(step, total, int(self.warmup_ratio * total))

    def forward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the student's forward needs for loss_from_outputs (hidden states, attentions)."""
        return {}

    @property
    def adds_loss_terms(self) -> bool:
        """Whether the training loss is more than the task loss of the student's outputs (distillation,
        contrastive terms, penalties): a loop that computes its own task loss must then use
        loss_from_outputs."""
        return False

    @property
    def adds_parameters(self) -> bool:
        """Whether adapt() gives the student trainable parameters of its own (movement scores), which
        train in added_param_groups() at their own LR."""
        return False

    def loss_from_outputs(self, batch: dict, outputs: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of `step` from the student's `outputs` on `batch` (a forward that had
        forward_kwargs()), and its terms for logging. Teachers run inside, without gradients."""
        loss = task_loss(outputs.logits, batch, self.ctx.objective)
        return loss, {"task": loss.item()}

    def training_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The student's forward on `batch`, then loss_from_outputs."""
        outputs = self.ctx.student(**model_inputs(batch), **self.forward_kwargs())
        return self.loss_from_outputs(batch, outputs, step)

    def after_step(self, step: int) -> dict[str, float]:
        """After the optimizer step of `step`: pruning events and the like; returns what happened."""
        return {}

    def state_dict(self) -> dict:
        """What resume needs beside the model's and optimizer's state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict() (after setup and the model state of the same checkpoint)."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")
