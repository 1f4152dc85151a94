"""How sparse a model is: the one way sparsebert counts kept weights.

A weight is kept when it is non-zero and, in a MaskedLinear, its mask bit is set; so a masked model
and its plain export (pruned weights stored as zeros) report the same numbers, and a plain model is
measured by its zeros. Movement scores and masks are bookkeeping, not parameters, and are not counted.
A model sharded by FSDP2 is counted shard by shard (every rank must call sparsity_report then).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as D
from ..families import matrix_role
from .modules import MaskedLinear


def kept_weights(module: nn.Linear) -> torch.Tensor:
    """Boolean map of the weights of a linear layer that count (of this rank's shard under FSDP2)."""
    kept = D.local(module.weight) != 0
    if isinstance(module, MaskedLinear):
        kept &= D.local_rows(module.dense_mask(), module.weight)
    return kept


def _count(kept: torch.Tensor, param) -> int:
    """Kept weights of a whole parameter: summed over the shards of an FSDP2 one (a collective)."""
    n = kept.sum().reshape(1)
    if D.is_sharded(param):
        D.all_reduce(n, D.shard_group(param))
    return int(n)


def _summary(rows: list[dict]) -> dict:
    numel, nnz = sum(r["numel"] for r in rows), sum(r["nnz"] for r in rows)
    return {"numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel if numel else 0.0}


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict:
    """Kept weights per matrix (the encoder matrices of the model's family and every MaskedLinear),
    and their sparsity: `overall` and `layers` over the encoder matrices, `pruned` over the masked
    (pruned) set, `all` over every parameter."""
    matrices, counted = [], {}
    for name, module in model.named_modules():
        place = matrix_role(name)
        if not isinstance(module, nn.Linear) or (place is None and not isinstance(module, MaskedLinear)):
            continue
        nnz = _count(kept_weights(module), module.weight)
        numel = module.weight.numel()
        matrices.append({"name": name, "layer": place[0] if place else None, "role": place[1] if place else None,
                         "masked": isinstance(module, MaskedLinear), "shape": list(module.weight.shape),
                         "numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel})
        counted[id(module.weight)] = nnz
    encoder = [m for m in matrices if m["layer"] is not None]
    layers: dict[str, list[dict]] = {}
    for m in encoder:
        layers.setdefault(str(m["layer"]), []).append(m)
    all_numel = all_nnz = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or name.endswith(".scores"):
            continue
        seen.add(id(param))
        all_numel += param.numel()
        all_nnz += counted[id(param)] if id(param) in counted else _count(D.local(param) != 0, param)
    return {
        "overall": _summary(encoder)["sparsity"],
        "layers": {k: _summary(v)["sparsity"] for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))},
        "matrices": matrices,
        "pruned": _summary([m for m in matrices if m["masked"]]),
        "all": {"numel": all_numel, "nnz": all_nnz, "sparsity": 1 - all_nnz / all_numel if all_numel else 0.0},
    }


def format_report(report: dict) -> str:
    """A sparsity_report as a text table, one line per matrix."""
    lines = [f"{'matrix':<60} {'shape':>12} {'sparsity':>9}"]
    for m in report["matrices"]:
        lines.append(f"{m['name']:<60} {'x'.join(map(str, m['shape'])):>12} {m['sparsity']:>9.4f}")
    lines.append(f"{'pruned set':<60} {report['pruned']['numel']:>12} {report['pruned']['sparsity']:>9.4f}")
    lines.append(f"{'all parameters':<60} {report['all']['numel']:>12} {report['all']['sparsity']:>9.4f}")
    return "\n".join(lines)
