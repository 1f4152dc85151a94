"""The sparsity engine: MaskedLinear, sparsify, criteria/patterns/schedules by name, the pruner,
sparse checkpoints and reports. Every mask goes through sparsebert.ops."""
from .checkpoint import export_dense, load_sparse, save_sparse
from .criteria import CRITERIA, Criterion, Importance, soft_movement_penalty
from .modules import MaskedLinear
from .patterns import PATTERNS
from .pruner import Pruner, lock
from .quant import FakeQuant, enable_qat, fake_quantize
from .report import format_report, kept_weights, sparsity_report
from .schedules import SCHEDULES, Cubic, Lock, LRRewind, NoPruning, OneShot, SanhThreshold, Schedule, linear_warmup_decay
from .sparsify import SparsifyConfig, masked_modules, sparsify

__all__ = [
    "CRITERIA", "PATTERNS", "SCHEDULES", "Criterion", "Cubic", "FakeQuant", "Importance", "LRRewind", "Lock",
    "MaskedLinear", "NoPruning", "OneShot", "Pruner", "SanhThreshold", "Schedule", "SparsifyConfig", "enable_qat",
    "export_dense", "fake_quantize", "format_report", "kept_weights", "linear_warmup_decay", "load_sparse", "lock",
    "masked_modules", "save_sparse", "soft_movement_penalty", "sparsify", "sparsity_report",
]
