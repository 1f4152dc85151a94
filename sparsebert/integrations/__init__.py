"""sparsebert in other people's training loops: :class:`Pruning` for any PyTorch loop, and
:mod:`sparsebert.integrations.hf_trainer` for the transformers ``Trainer``."""
from .pruning import Pruning, infer_objective

__all__ = ["Pruning", "infer_objective"]
