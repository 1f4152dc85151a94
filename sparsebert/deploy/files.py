"""The compressed file of a deployed model, and loading it back.

A deployed model is a directory: the transformers ``config.json``, the tokenizer files of its source
(when it had them) and ``compressed_model.safetensors``. In that file a prunable layer ``<name>`` is
``<name>.mask`` (bit-packed, 1 bit per weight; see :mod:`sparsebert.ops.mask`) and ``<name>.values``
(the kept weights in row-major order), plus ``<name>.bias``; every other tensor is stored as is. At 90%
sparsity a float32 matrix takes 1/32 + 10% = 13.1% of its dense bytes, whatever its shape. The
header metadata holds the format name and version, the architecture, each layer's kernel choice and the
sha256 of the tensors (names, dtypes, shapes and bytes), checked on every load.

The kernel-specific layout (sparse_linear's block rows and int16 columns) is rebuilt at load, so the
file does not depend on the machine that made the choices.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__, ops
from . import sources
from .convert import LayerPlan, build_layer, check_target, plan_layer
from .modules import SparseLinear
from .sources import DEPLOYED_WEIGHTS, TOKENIZER_FILES, _replace

FORMAT = "sparsebert-deploy"
FORMAT_VERSION = 1


class DeployFormatError(ValueError):
    """A deployed model that cannot be loaded: corrupted, inconsistent, or from a newer sparsebert."""


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _weight_and_keep(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, SparseLinear):
        return module.dense_weight(), module.kept()
    weight = module.weight
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        weight = weight.to_dense()
    return weight.detach(), weight != 0


def compressed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, str]]:
    """(tensors, layer plans with their stored nnz, {alias: stored name} of tied tensors)."""
    layers = [dict(layer) for layer in model.sparsebert_deploy["layers"]]
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        module = model.get_submodule(layer["name"])
        weight, keep = _weight_and_keep(module)
        tensors[f"{layer['name']}.mask"] = ops.pack_mask(keep).cpu()
        tensors[f"{layer['name']}.values"] = weight[keep].cpu()
        if module.bias is not None:
            tensors[f"{layer['name']}.bias"] = module.bias.detach().cpu()
        layer["nnz"] = int(keep.sum())
    prunable = tuple(f"{layer['name']}." for layer in layers)
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if key.startswith(prunable):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ptr in seen:
            aliases[key] = seen[ptr]
            continue
        if ptr is not None:
            seen[ptr] = key
        tensors[key] = t.detach().cpu().contiguous()
    return tensors, layers, aliases


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Write a converted model (see :func:`sparsebert.deploy.convert`) to ``directory``, atomically: the
    files are written into a temporary directory beside it, which is then renamed. ``overwrite`` replaces
    an existing deployed model (never any other directory)."""
    info = getattr(model, "sparsebert_deploy", None)
    if info is None:
        raise ValueError("save_pretrained: not a converted model; run sparsebert.deploy.convert(model) first")
    directory = pathlib.Path(directory)
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (--force) to replace it")
        if not (directory / DEPLOYED_WEIGHTS).is_file():
            raise FileExistsError(f"{directory} is not a deployed sparsebert model; refusing to replace it")
    tensors, layers, aliases = compressed_tensors(model)
    dtype = str(next(t for n, t in tensors.items() if n.endswith(".values")).dtype).removeprefix("torch.")
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "sparsebert_version": __version__,
                "architecture": type(model).__name__, "dtype": dtype, "layers": json.dumps(layers),
                "aliases": json.dumps(aliases), "modules": json.dumps([n for n, _ in model.named_modules()]),
                "sha256": content_hash(tensors)}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / DEPLOYED_WEIGHTS), metadata=metadata)
        source_dir = pathlib.Path(info["source_dir"]) if info.get("source_dir") else None
        for name in TOKENIZER_FILES:
            if source_dir is not None and (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _swap_in(new: pathlib.Path, directory: pathlib.Path) -> None:
    if not directory.exists():
        os.replace(new, directory)
        return
    old = new.with_suffix(".old")
    os.replace(directory, old)
    os.replace(new, directory)
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a deployed model, with its format and version checked."""
    path = pathlib.Path(directory) / DEPLOYED_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a deployed sparsebert model (no {DEPLOYED_WEIGHTS})")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise DeployFormatError(f"{path} is corrupted: its header cannot be read ({e})") from None
    if metadata.get("format") != FORMAT:
        raise DeployFormatError(f"{path} is not a {FORMAT} file (format {metadata.get('format')!r})")
    try:
        version = int(metadata["format_version"])
    except (KeyError, ValueError):
        raise DeployFormatError(f"{path} has no valid format_version") from None
    if version > FORMAT_VERSION:
        raise DeployFormatError(f"{path} was written by a newer sparsebert (format version {version}, by sparsebert "
                                f"{metadata.get('sparsebert_version')}); this sparsebert {__version__} reads versions "
                                f"up to {FORMAT_VERSION}. Upgrade sparsebert")
    return metadata


def from_pretrained(directory: str | os.PathLike, *, device: str | torch.device = "cpu", kernel: str | None = None, timing_tokens: tuple[int, ...] = ()) -> nn.Module:
    """Load a deployed model. ``kernel`` None keeps the stored per-layer choices; ``"auto"`` (timed at
    ``timing_tokens``), ``"sparse"``, ``"dense"`` or ``"2:4"`` choose again on this machine."""
    directory = pathlib.Path(directory)
    metadata = read_metadata(directory)
    path = directory / DEPLOYED_WEIGHTS
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise DeployFormatError(f"{path} is corrupted: its tensors cannot be read ({e})") from None
    if content_hash(tensors) != metadata.get("sha256"):
        raise DeployFormatError(f"{path} is corrupted: the sha256 of its tensors does not match the one stored when "
                                f"it was written")
    device = torch.device(device)
    dtype = getattr(torch, metadata["dtype"])
    check_target(device, dtype, str(path))
    layers = [LayerPlan(**layer) for layer in json.loads(metadata["layers"])]
    aliases = json.loads(metadata.get("aliases", "{}"))
    config = transformers.AutoConfig.from_pretrained(directory)
    model = getattr(transformers, metadata["architecture"])(config).to(device=device, dtype=dtype)
    _drop_absent_modules(model, json.loads(metadata.get("modules", "[]")))
    with torch.no_grad():
        for plan in layers:
            weight, keep, bias = _layer_tensors(tensors, plan, dtype, device, path)
            if kernel is not None:
                plan = plan_layer(plan.name, weight, keep, kernel, timing_tokens)
            _replace(model, plan.name, build_layer(plan, weight, keep, bias))
    prunable = tuple(f"{plan.name}." for plan in layers)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith(prunable) and k not in aliases]
    if missing or unexpected:
        raise DeployFormatError(f"{path} does not match its {metadata['architecture']} config: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    model.sparsebert_deploy = {"source": "deployed model", "source_dir": str(directory),
                               "layers": [dataclasses.asdict(p) for p in layers]}
    return model.eval()


def _drop_absent_modules(model: nn.Module, saved: list[str]) -> None:
    """Optional submodules the saved model was built without (e.g. BertModel(add_pooling_layer=False)'s
    pooler): constructor arguments are not in the config, so the rebuilt model has them; set them to None."""
    saved = set(saved)
    if not saved:
        return
    for name, _ in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if name not in saved and parent in saved:
            setattr(model.get_submodule(parent) if parent else model, child, None)


def _layer_tensors(tensors, plan: LayerPlan, dtype, device, path):
    """(dense weight with zeros, keep mask, bias) of one stored layer, popped from ``tensors``."""
    mask = tensors.pop(f"{plan.name}.mask", None)
    values = tensors.pop(f"{plan.name}.values", None)
    bias = tensors.pop(f"{plan.name}.bias", None)
    shape = (plan.out_features, (plan.in_features + 7) // 8)
    if mask is None or values is None or mask.dtype != torch.uint8 or tuple(mask.shape) != shape:
        raise DeployFormatError(f"{path}: layer {plan.name}: mask/weight mismatch: expected a uint8 mask of shape "
                                f"{shape}, got {None if mask is None else (mask.dtype, tuple(mask.shape))}")
    keep = ops.unpack_mask(mask, plan.in_features)
    if values.dim() != 1 or values.numel() != int(keep.sum()):
        raise DeployFormatError(f"{path}: layer {plan.name}: mask/values mismatch: the mask keeps {int(keep.sum())} "
                                f"weights, {values.numel()} values are stored")
    weight = torch.zeros(plan.out_features, plan.in_features, dtype=dtype)
    weight[keep] = values.to(dtype)
    return weight.to(device), keep.to(device), None if bias is None else bias.to(device=device, dtype=dtype)


sources.LOADERS["deployed model"] = from_pretrained
