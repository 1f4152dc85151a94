"""Dense fine-tuning: the teacher stage, and the reference every sparse result is compared with."""
from .base import Method, register_method


@register_method
class Dense(Method):
    name = "dense"

    def setup(self, ctx):
        if ctx.objective == "representation":
            raise ValueError("method 'dense' needs a supervised objective; 'representation' learns only from a teacher")
        super().setup(ctx)
