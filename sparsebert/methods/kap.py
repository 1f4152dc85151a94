"""SparseBERT's knowledge-aware pruning (Xu et al., NAACL 2021): prune while fine-tuning, starting from
the pre-trained model, with the fine-tuned model as teacher. Loss: attention MSE + hidden-state MSE +
soft cross-entropy to the teacher's predictions (no hard labels); per-matrix magnitude pruning on a cubic
schedule of ~100 events to 90-95%."""
from ..objectives import TASK_OBJECTIVES
from .base import register_method
from .sparse import SparseMethod


@register_method
class SparseBertKAP(SparseMethod):
    name = "sparsebert-kap"
    objectives = TASK_OBJECTIVES
    defaults = {
        "sparsity": 0.9,
        "criterion": "magnitude",
        "pattern": "tensor",
        "schedule": "cubic",
        "begin_frac": 0.0,
        "end_frac": 0.6,
        "events": 100,
        "distill": {"task": 0.0, "logits": 1.0, "temperature": 1.0, "logit_loss": "soft-ce", "hidden": 1.0, "attention": 1.0},
    }

