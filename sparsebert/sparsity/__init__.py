"""The sparsity engine: MaskedLinear, sparsify, criteria/patterns/schedules by name, the pruner,
sparse checkpoints and reports. Every mask goes through sparsebert.ops."""
from . import criteria, patterns, schedules  # noqa: F401  (register)
from .checkpoint import export_dense, load_sparse, save_sparse
from .criteria import Importance, soft_movement_penalty
from .modules import MaskedLinear
from .pruner import Pruner, lock
from .quant import FakeQuant, enable_qat, fake_quantize
from .registry import CRITERIA, PATTERNS, SCHEDULES
from .report import encoder_sparsity, format_report, sparsity_report
from .schedules import Cubic, LRRewind, OneShot, SanhThreshold
from .sparsify import ENCODER_LINEARS, SparsifyConfig, masked_modules, sparsify

__all__ = [
    "CRITERIA", "PATTERNS", "SCHEDULES", "ENCODER_LINEARS", "Cubic", "FakeQuant", "Importance", "LRRewind",
    "MaskedLinear", "OneShot", "Pruner", "SanhThreshold", "SparsifyConfig", "enable_qat", "encoder_sparsity",
    "export_dense", "fake_quantize", "format_report", "load_sparse", "lock", "masked_modules", "save_sparse",
    "soft_movement_penalty", "sparsify", "sparsity_report",
]
