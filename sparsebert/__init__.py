"""sparsebert: sparse pre-trained language models.

Fused pruning ops (C++ for CPU, CUDA for GPU) registered as ``torch.ops.sparsebert.*``,
and the pruning pipelines built on them.
"""
import pkgutil

import torch

# A source checkout on sys.path (running from the repository root) shadows the
# installed package; extending __path__ lets it still find the compiled _C there.
__path__ = pkgutil.extend_path(__path__, __name__)

from . import _C  # noqa: E402  (registers torch.ops.sparsebert.*)

__version__ = "0.1.0"

#: Backends the compiled extension was built with, e.g. ("cpu",) or ("cpu", "cuda").
backends: tuple[str, ...] = ("cpu", "cuda") if _C.with_cuda else ("cpu",)
#: Whether the CPU kernels run on torch's intra-op threads (built with OpenMP) or on one thread.
cpu_parallel: bool = bool(_C.with_openmp)

from . import ops, optim  # noqa: E402,F401

__all__ = ["Pruning", "__version__", "backends", "cpu_parallel", "ops", "optim", "sparsify"]


def __getattr__(name: str) -> object:
    # sparsebert.sparsify and sparsebert.Pruning without importing transformers/safetensors on every
    # `import sparsebert`.
    if name == "sparsify":
        from .sparsity import sparsify

        return sparsify
    if name == "Pruning":
        from .integrations import Pruning

        return Pruning
    raise AttributeError(f"module 'sparsebert' has no attribute {name!r}")
