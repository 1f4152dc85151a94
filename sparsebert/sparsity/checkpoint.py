"""Sparse checkpoints (weights + masks + scores, safetensors, with JSON metadata) and the export to a
plain transformers checkpoint (pruned weights stored as zeros) that loads without sparsebert."""
from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn

from .quant import enable_qat, fake_quantize
from .report import sparsity_report
from .sparsify import masked_modules, sparsify

WEIGHTS = "sparse_model.safetensors"
METADATA = "sparsebert.json"
FORMAT = 1


def save_sparse(model: nn.Module, directory: str | os.PathLike, *, metadata: dict | None = None) -> pathlib.Path:
    """Write config.json, the full state (masks and movement scores included) and sparsebert.json."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "sparsebert_config"):
        raise ValueError("save_sparse: the model was not sparsified (no sparsebert_config)")
    model.config.save_pretrained(directory)
    # save_model drops the duplicate names of shared tensors (tied embeddings) and load_model restores them.
    save_model(model, str(directory / WEIGHTS))
    report = sparsity_report(model)
    meta = {
        "format": FORMAT,
        "architecture": type(model).__name__,
        "sparsify": model.sparsebert_config,
        "quantized": next((m.quantizer.bits for m in masked_modules(model).values() if m.quantizer is not None), 0),
        "absent_modules": absent_modules(model),
        "sparsity": {"pruned": report["pruned"], "all": report["all"]},
        **(metadata or {}),
    }
    (directory / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def absent_modules(model: nn.Module) -> list[str]:
    """Submodules that the model's class builds from its config alone but this model left out (a
    BertModel made with add_pooling_layer=False has no pooler): the outermost such names."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    have = {name for name, _ in model.named_modules()}
    absent: list[str] = []
    for name, _ in fresh.named_modules():
        if name not in have and not any(name.startswith(a + ".") for a in absent):
            absent.append(name)
    return absent


def load_sparse(directory: str | os.PathLike, model_class: type[nn.Module] | None = None) -> nn.Module:
    """Rebuild the architecture from config.json, sparsify it as saved, and load every tensor (strict)."""
    directory = pathlib.Path(directory)
    meta = json.loads((directory / METADATA).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: unsupported sparse checkpoint format {meta.get('format')!r}")
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = model_class or getattr(transformers, meta["architecture"])
    model = cls(config)
    for name in meta.get("absent_modules", []):  # e.g. a BertModel built with add_pooling_layer=False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, None)
    modules = sparsify(model, meta["sparsify"])
    if meta.get("quantized"):
        enable_qat(modules, int(meta["quantized"]))
    missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=True)
    for module in modules.values():
        # The promise the forward relies on is a property of the tensors, so it is re-derived, not stored.
        module.weight_is_masked = not bool(((module.weight != 0) & ~module.dense_mask()).any())
    model.eval()
    return model


@torch.no_grad()
def export_dense(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None) -> pathlib.Path:
    """A plain transformers checkpoint: MaskedLinear -> nn.Linear holding W * M (fake-quantized values
    when QAT is on: activation quantization is not representable there). No masks, no scores."""
    plain = copy.deepcopy(model)
    for name, module in masked_modules(plain).items():
        weight = module.effective_weight()
        if module.quantizer is not None:
            weight = fake_quantize(weight, weight.abs().max(), module.quantizer.bits)
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, dtype=weight.dtype, device=weight.device)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, linear)
    if hasattr(plain, "sparsebert_config"):
        del plain.sparsebert_config
    directory = pathlib.Path(directory)
    plain.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
