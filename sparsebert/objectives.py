"""What a model is trained for: the objectives, their supervised losses, and the batch keys a
transformers model's forward takes. Shared by the distillation losses and the methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import mean_over

__all__ = ["MODEL_INPUTS", "OBJECTIVES", "TASK_OBJECTIVES", "model_inputs", "task_loss"]

OBJECTIVES = ("classification", "regression", "mlm", "representation")
TASK_OBJECTIVES = ("classification", "regression")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The keys of a batch that a transformers model's forward takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def task_loss(logits: torch.Tensor, batch: dict, objective: str) -> torch.Tensor:
    """The supervised loss of an objective: cross-entropy, MSE, or masked-LM cross-entropy; a mean over
    the examples (masked tokens for mlm) of the global batch inside `sparsebert.distributed.global_batch`."""
    if objective == "classification":
        return mean_over(F.cross_entropy(logits, batch["labels"], reduction="sum"), logits.shape[0])
    if objective == "regression":
        return mean_over(F.mse_loss(logits.squeeze(-1), batch["labels"].to(logits.dtype), reduction="sum"), logits.shape[0])
    if objective == "mlm":
        labels = batch["labels"].flatten()
        loss = F.cross_entropy(logits.flatten(0, -2), labels, ignore_index=-100, reduction="sum")
        return mean_over(loss, (labels != -100).sum())
    raise ValueError(f"objective {objective!r} has no supervised task loss")
