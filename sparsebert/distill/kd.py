"""Knowledge distillation from a teacher: logits (Hinton), hidden states and attentions (TinyBERT)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..distributed import mean_over
from ..objectives import task_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over rows (examples or tokens; those of the
    global batch inside `sparsebert.distributed.global_batch`, as every mean here). The T^2 keeps
    the gradient scale independent of T (Hinton et al. 2015)."""
    s, t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2).detach()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="sum", log_target=True)
    return mean_over(kl, s.shape[0]) * temperature**2


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-sum softmax(t/T) log softmax(s/T), averaged over rows (TinyBERT/SparseBERT prediction loss)."""
    s, t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2).detach()
    return mean_over(-(F.softmax(t / temperature, -1) * F.log_softmax(s / temperature, -1)).sum(), s.shape[0])


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher hidden-state index for each student hidden-state index 0..L_s (0 = embeddings):
    uniform, g(m) = m * L_t / L_s (TinyBERT), so the last layers always meet."""
    if teacher_layers % student_layers:
        raise ValueError(f"uniform layer map needs teacher layers ({teacher_layers}) divisible by student layers ({student_layers})")
    return [i * teacher_layers // student_layers for i in range(student_layers + 1)]


def _token_weights(attention_mask: torch.Tensor | None, like: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[batch, length]: 1 for real tokens, 0 for padding."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=like.dtype, device=like.device)
    return attention_mask.to(like.dtype)


def hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mapping: list[int],
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over mapped layers of the MSE between hidden states [B, T, H], over real (non-padding) tokens."""
    total, tokens = 0.0, None
    for i, j in enumerate(mapping):
        hs, ht = student[i], teacher[j].detach()
        if hs.shape[-1] != ht.shape[-1]:
            raise ValueError(f"hidden MSE needs equal widths, got student {hs.shape[-1]} vs teacher {ht.shape[-1]}")
        w = _token_weights(attention_mask, hs, hs.shape[0], hs.shape[1])
        total, tokens = total + (((hs - ht) ** 2).mean(-1) * w).sum(), w.sum()
    return mean_over(total, tokens) / len(mapping)


def attention_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mapping: list[int],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over mapped layers of the MSE between attention probabilities [B, heads, T, T], over the rows
    of real query tokens (padding keys have probability 0 in both)."""
    total, rows = 0.0, None
    for i, j in enumerate(mapping[1:]):
        a_s, a_t = student[i], teacher[j - 1].detach()
        w = _token_weights(attention_mask, a_s, a_s.shape[0], a_s.shape[2])[:, None, :]
        total, rows = total + (((a_s - a_t) ** 2).mean(-1) * w).sum(), w.sum() * a_s.shape[1]
    return mean_over(total, rows) / (len(mapping) - 1)


@dataclasses.dataclass
class DistillConfig:
    """Loss = task * L_task + logits * L_logits(T) + hidden * L_hidden + attention * L_attention.
    For regression (one output) the logits term is the MSE to the teacher's prediction, as SparseBERT
    distils STS-B: KL and soft cross-entropy of a single logit are identically 0."""
    task: float = 1.0
    logits: float = 0.0
    temperature: float = 1.0
    logit_loss: str = "kl"  # "kl" (KL * T^2) or "soft-ce" (soft cross-entropy)
    hidden: float = 0.0
    attention: float = 0.0
    layer_map: list[int] | None = None  # default: uniform

    def __post_init__(self):
        if self.logit_loss not in ("kl", "soft-ce"):
            raise ValueError(f"logit_loss must be 'kl' or 'soft-ce', got {self.logit_loss!r}")

    @property
    def needs_teacher(self) -> bool:
        return bool(self.logits or self.hidden or self.attention)


def distill_loss(config: DistillConfig, student_out: Any, teacher_out: Any, batch: dict,
                 objective: str) -> tuple[torch.Tensor, dict]:
    """Combine the task loss and the distillation terms. Outputs are transformers ModelOutputs; hidden
    states/attentions must have been requested when the weights need them."""
    total, logs = 0.0, {}
    if config.task:
        loss = task_loss(student_out.logits, batch, objective)
        total, logs["task"] = total + config.task * loss, loss.item()
    if config.logits:
        s, t = student_out.logits, teacher_out.logits
        if objective == "mlm":  # only the masked positions carry a prediction
            keep = batch["labels"] != -100
            s, t = s[keep], t[keep]
        if objective == "regression":
            loss = F.mse_loss(s.float(), t.detach().float())
        elif config.logit_loss == "kl":
            loss = kd_loss(s, t, config.temperature)
        else:
            loss = soft_cross_entropy(s, t, config.temperature)
        total, logs["kd"] = total + config.logits * loss, loss.item()
    if config.hidden or config.attention:
        n_s = len(student_out.hidden_states if config.hidden else student_out.attentions) - (1 if config.hidden else 0)
        n_t = len(teacher_out.hidden_states if config.hidden else teacher_out.attentions) - (1 if config.hidden else 0)
        mapping = config.layer_map or layer_map(n_s, n_t)
        mask = batch.get("attention_mask")
        if config.hidden:
            loss = hidden_mse(student_out.hidden_states, teacher_out.hidden_states, mapping, mask)
            total, logs["hidden"] = total + config.hidden * loss, loss.item()
        if config.attention:
            loss = attention_mse(student_out.attentions, teacher_out.attentions, mapping, mask)
            total, logs["attention"] = total + config.attention * loss, loss.item()
    if not torch.is_tensor(total):
        raise ValueError("distill_loss: every loss weight is zero")
    return total, logs
