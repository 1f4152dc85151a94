"""Dense fine-tuning: the teacher stage, and the reference every sparse result is compared with."""
from ..objectives import TASK_OBJECTIVES
from .base import Method, register_method


@register_method
class Dense(Method):
    name = "dense"
    # 'representation' has no labels: it learns only from a teacher.
    objectives = (*TASK_OBJECTIVES, "mlm")
