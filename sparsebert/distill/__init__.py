"""Distillation losses: logits KD, layer-to-layer hidden/attention MSE, and CAP's contrastive terms."""
from .contrastive import ContrastiveConfig, ContrastiveModule, MemoryBank, contrastive_loss
from .kd import DistillConfig, attention_mse, distill_loss, hidden_mse, kd_loss, layer_map, soft_cross_entropy

__all__ = [
    "ContrastiveConfig", "ContrastiveModule", "DistillConfig", "MemoryBank", "attention_mse", "contrastive_loss",
    "distill_loss", "hidden_mse", "kd_loss", "layer_map", "soft_cross_entropy",
]
