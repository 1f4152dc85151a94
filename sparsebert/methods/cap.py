"""CAP, contrastive pruning (Xu et al., AAAI 2022): movement (CAP-m) or soft-movement (CAP-soft) pruning,
or its structured variant over heads and FFN neurons (pattern "structured"), trained with 0.1 task CE +
0.9 KD (T=2) from the fine-tuned teacher, plus the contrastive terms PrC (pre-trained model), SnC
(snapshots during pruning) and FiC (fine-tuned teacher), each unsupervised + supervised. Sanh et al.'s
schedule: warm-up at 0% for an epoch, cubic to the target (90-97%), cool-down at the target; masks follow
the scores every step."""
from ..objectives import TASK_OBJECTIVES
from .base import register_method
from .sparse import SparseMethod


@register_method
class CAP(SparseMethod):
    name = "cap"
    objectives = TASK_OBJECTIVES
    defaults = {
        "sparsity": 0.9,
        "criterion": "movement",
        "pattern": "tensor",
        "schedule": "sanh",
        "warmup_frac": 0.334,  # one epoch of the recipe's three: the scores need it (see sparsebert/recipes/cap)
        "cooldown_frac": 0.2,
        "frequency": 1,
        "score_lr": 1e-2,
        "distill": {"task": 0.1, "logits": 0.9, "temperature": 2.0, "logit_loss": "kl"},
        "contrastive": {"temperature": 0.1, "unsupervised": 0.1, "supervised": 0.1},
    }

