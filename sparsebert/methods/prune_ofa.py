"""Prune Once For All (Zafrir et al. 2021): sparse pre-trained models, transferred with their pattern.

upstream:   gradual magnitude pruning (cubic, uniform per matrix) over the first half of training, with
            distillation from the dense model: MLM CE 0.5 + KL 0.5 at T=2, or, for encoders without an MLM
            head (objective "representation"), hidden-state + attention MSE on raw text; LR rewinding
            once pruning ends.
downstream: pattern lock (mask = weight != 0) + KD from the fine-tuned dense teacher (CE 0.5 + KL 0.5,
            T=2); `quantize: true` adds 8-bit QAT on top of the locked pattern.
"""
from __future__ import annotations

import copy

from ..distributed import unwrap
from .base import register_method
from .sparse import SparseMethod

KD_MLM = {"task": 0.5, "logits": 0.5, "temperature": 2.0, "logit_loss": "kl"}
KD_REPRESENTATION = {"task": 0.0, "hidden": 1.0, "attention": 1.0}
KD_DOWNSTREAM = {"task": 0.5, "logits": 0.5, "temperature": 2.0, "logit_loss": "kl"}

STAGES = {
    "upstream": {"schedule": "cubic", "sparsity": 0.9, "pattern": "tensor", "begin_frac": 0.0, "end_frac": 0.5,
                 "events": 50, "lr_rewind": True},
    "downstream": {"schedule": "lock"},
}


@register_method
class PruneOFA(SparseMethod):
    name = "prune-ofa"
    defaults = {"stage": "upstream"}

    def __init__(self, stage: str = "upstream", **config):
        if stage not in STAGES:
            raise ValueError(f"prune-ofa: stage must be one of {sorted(STAGES)}, got {stage!r}")
        self.explicit_distill = "distill" in config
        super().__init__(stage=stage, **{**STAGES[stage], **config})
        self.stage = stage

    @property
    def adds_loss_terms(self) -> bool:
        # Both stages' default losses distill (set in setup(), by the objective); known before setup.
        return True if not self.explicit_distill else super().adds_loss_terms

    def setup(self, ctx) -> None:
        if not self.explicit_distill:
            if self.stage == "downstream":
                self.distill = type(self.distill)(**KD_DOWNSTREAM)
            else:
                self.distill = type(self.distill)(**(KD_REPRESENTATION if ctx.objective == "representation" else KD_MLM))
        if self.stage == "upstream" and ctx.teacher is None:
            # The teacher upstream is the dense model itself, frozen before pruning starts.
            ctx.teacher = copy.deepcopy(unwrap(ctx.student)).eval().requires_grad_(False)
        super().setup(ctx)
