"""Sparsity report: per pruned matrix, over the pruned set, and over all parameters."""
from __future__ import annotations

from torch import nn

from .modules import MaskedLinear


def sparsity_report(model: nn.Module) -> dict:
    """Counts kept weights by the mask for MaskedLinear modules and by non-zeros elsewhere, so a
    masked model and its plain export (pruned weights stored as zeros) report the same numbers.
    Movement scores and masks are bookkeeping, not parameters of the network, and are not counted."""
    matrices, all_numel, all_nnz = [], 0, 0
    masked = {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}
    for name, module in masked.items():
        numel, nnz = module.weight.numel(), module.nnz()
        matrices.append({"name": name, "shape": list(module.weight.shape), "numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel})
    masked_weights = {f"{n}.weight" for n in masked}
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or name.endswith(".scores"):
            continue
        seen.add(id(param))
        all_numel += param.numel()
        if name in masked_weights:
            all_nnz += next(m["nnz"] for m in matrices if f"{m['name']}.weight" == name)
        else:
            all_nnz += int((param != 0).sum())
    pruned_numel = sum(m["numel"] for m in matrices)
    pruned_nnz = sum(m["nnz"] for m in matrices)
    return {
        "matrices": matrices,
        "pruned": {"numel": pruned_numel, "nnz": pruned_nnz, "sparsity": 1 - pruned_nnz / pruned_numel if pruned_numel else 0.0},
        "all": {"numel": all_numel, "nnz": all_nnz, "sparsity": 1 - all_nnz / all_numel},
    }


def encoder_sparsity(model: nn.Module, pattern: str | None = None) -> dict:
    """Sparsity of the encoder linear weights by their values (works on plain, unsparsified models)."""
    from .sparsify import SparsifyConfig

    config = SparsifyConfig.coerce({"include": [pattern]} if pattern else None)
    numel = nnz = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and config.selects(name):
            weight = module.effective_weight() if isinstance(module, MaskedLinear) else module.weight
            numel += weight.numel()
            nnz += int((weight != 0).sum())
    return {"numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel if numel else 0.0}


def format_report(report: dict) -> str:
    lines = [f"{'matrix':<60} {'shape':>12} {'sparsity':>9}"]
    for m in report["matrices"]:
        lines.append(f"{m['name']:<60} {'x'.join(map(str, m['shape'])):>12} {m['sparsity']:>9.4f}")
    lines.append(f"{'pruned set':<60} {report['pruned']['numel']:>12} {report['pruned']['sparsity']:>9.4f}")
    lines.append(f"{'all parameters':<60} {report['all']['numel']:>12} {report['all']['sparsity']:>9.4f}")
    return "\n".join(lines)
