"""Conversion: a pruned model becomes an inference model whose prunable layers each run the faster of
the sparse kernel and dense GEMM, chosen from the layer's sparsity and shape and, optionally, timed."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends, ops
from . import sources
from .modules import SparseLinear, check_semi_structured, dense_linear, semi_structured_linear
from .timing import interleaved_medians

KERNELS = ("auto", "sparse", "dense", "2:4")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# From this sparsity on, "auto" takes the CPU's AVX-512 sparse kernel without timing: it breaks even with
# MKL at about 50% and was 1.24x to 1.75x faster at 60% over the MiniLM and BERT-base shapes at 16 to
# 1024 tokens (one thread), several times faster at 90%. A timing on a loaded machine is noisier than that.
SPARSE_FROM = 0.6
# Below this sparsity dense GEMM wins everywhere: not worth timing.
DENSE_BELOW = 0.4
TIMING_ROUNDS = 5


@dataclasses.dataclass
class LayerPlan:
    """One prunable layer's kernel choice at conversion, with its reason and any timings."""

    name: str
    out_features: int
    in_features: int
    nnz: int
    block_rows: int
    kernel: str  # "sparse", "dense" or "2:4"
    reason: str
    timings: list[dict] = dataclasses.field(default_factory=list)  # {tokens, dense_ms, sparse_ms}

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.out_features * self.in_features)


def convert(source: nn.Module | str | os.PathLike | sources.Source, *, kernel: str = "auto",
            timing_tokens: tuple[int, ...] = (128,), device: str | torch.device | None = None) -> nn.Module:
    """An inference copy of ``source`` (a model, a path that :func:`sparsebert.deploy.sources.resolve`
    accepts, or a :class:`~sparsebert.deploy.sources.Source`, whose model is then converted in place)
    whose prunable Linear layers hold packed weights (:class:`SparseLinear`), dense weights (``nn.Linear``)
    or 2:4 semi-structured weights, per ``kernel``:

    - ``"auto"``: per layer, the sparse kernel where it is faster than dense GEMM: dense below
      ``DENSE_BELOW`` sparsity, sparse from ``SPARSE_FROM`` with the CPU's AVX-512 kernel, and in
      between (or on other CPUs and on CUDA) timed at each of ``timing_tokens`` (empty: dense);
    - ``"sparse"`` / ``"dense"``: every layer;
    - ``"2:4"``: PyTorch's semi-structured kernels (CUDA, compute capability 8.0+, 2:4-pruned fp16/bf16).

    The choices are in ``model.sparsebert_deploy["layers"]``. The source is not modified.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    src = source if isinstance(source, sources.Source) else sources.load(source)
    model = src.model if device is None else src.model.to(device)
    _check_model(model, src, kernel)
    plans = []
    with torch.no_grad():
        for name, keep in src.masks.items():
            linear = model.get_submodule(name)
            keep = keep.to(linear.weight.device)
            plan = plan_layer(name, linear.weight, keep, kernel, timing_tokens)
            sources._replace(model, name, build_layer(plan, linear.weight, keep, linear.bias))
            plans.append(plan)
    model.sparsebert_deploy = {"source": src.kind, "source_dir": str(src.directory) if src.directory else None,
                               "layers": [dataclasses.asdict(p) for p in plans]}
    return model.eval()


def check_target(device: torch.device, dtype: torch.dtype, where: str) -> None:
    """The dtypes and devices the sparse kernels run on: anything else is an error before any work."""
    if dtype not in DTYPES:
        raise ValueError(f"{where}: unsupported dtype {dtype}; the sparse kernels take float32, bfloat16 or float16 "
                         f"(convert the model with .float() first)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: unsupported device {device}; the sparse kernels run on cpu and cuda")
    if device.type == "cuda" and "cuda" not in backends:
        raise ValueError(f"{where}: the model is on {device} but sparsebert was built without CUDA kernels")


def _check_model(model: nn.Module, src: sources.Source, kernel: str) -> None:
    """Unsupported dtype or device, or nothing pruned: an error before any layer is converted."""
    for name in src.masks:
        weight = model.get_submodule(name).weight
        check_target(weight.device, weight.dtype, name)
        if kernel == "2:4":
            check_semi_structured(weight, name)
    numel = sum(k.numel() for k in src.masks.values())
    nnz = sum(int(k.sum()) for k in src.masks.values())
    if nnz == numel:
        raise ValueError(f"the {src.kind} has no sparsity: its {len(src.masks)} prunable layers are fully dense, "
                         f"so a sparse deployment would only be slower. Prune it first (sparsebert.sparsify)")


def plan_layer(name: str, weight: torch.Tensor, keep: torch.Tensor, kernel: str, timing_tokens) -> LayerPlan:
    out_features, in_features = weight.shape
    plan = LayerPlan(name, out_features, in_features, int(keep.sum()), ops.block_rows_of(keep), "dense", "")
    if kernel in ("sparse", "dense", "2:4"):
        plan.kernel, plan.reason = kernel, "requested"
    elif plan.sparsity < DENSE_BELOW:
        plan.reason = f"sparsity {plan.sparsity:.2f} < {DENSE_BELOW}"
    elif plan.sparsity >= SPARSE_FROM and weight.device.type == "cpu" and avx512():
        plan.kernel, plan.reason = "sparse", f"sparsity {plan.sparsity:.2f} >= {SPARSE_FROM} (AVX-512)"
    elif timing_tokens:
        packed = ops.pack_sparse(weight, ops.pack_mask(keep), block_rows=plan.block_rows)
        plan.timings = [time_layer(weight, packed, t) for t in timing_tokens]
        faster = all(t["sparse_ms"] < t["dense_ms"] for t in plan.timings)
        plan.kernel = "sparse" if faster else "dense"
        plan.reason = "timed: " + ", ".join(f"{t['tokens']} tokens {t['dense_ms'] / t['sparse_ms']:.2f}x" for t in plan.timings)
    else:
        plan.reason = f"sparsity {plan.sparsity:.2f} untimed on {weight.device.type}"
    return plan


def avx512() -> bool:
    """Whether sparse_linear runs its AVX-512 kernel here (it follows torch's CPU capability)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def build_layer(plan: LayerPlan, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if plan.kernel == "sparse":
        return SparseLinear(ops.pack_sparse(weight, ops.pack_mask(keep), block_rows=plan.block_rows), bias)
    if plan.kernel == "2:4":
        return semi_structured_linear(weight, bias)
    return dense_linear(weight, bias)


def time_layer(weight: torch.Tensor, packed: ops.SparseWeight, tokens: int) -> dict:
    """Median times of dense F.linear and sparse_linear on one random input, in interleaved rounds."""
    x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
    medians = interleaved_medians({"dense": lambda: F.linear(x, weight), "sparse": lambda: ops.sparse_linear(x, *packed[:3])},
                                  TIMING_ROUNDS, weight.device)
    return {"tokens": tokens, **{f"{k}_ms": v * 1e3 for k, v in medians.items()}}
