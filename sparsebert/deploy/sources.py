"""What can be converted: a model in memory, a run directory, a sparse checkpoint, an exported model or
an already deployed model, each brought to one form: the dense-with-zeros model and its keep masks."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
from typing import Callable

import torch
import transformers
from torch import nn

from ..sparsity import checkpoint
from ..sparsity.modules import MaskedLinear
from ..sparsity.sparsify import SparsifyConfig
from .modules import SparseLinear, dense_linear

DEPLOYED_WEIGHTS = "compressed_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


@dataclasses.dataclass
class Source:
    """model: a plain transformers model whose prunable nn.Linear layers hold W * M (pruned entries 0).
    masks: {layer name: bool keep mask [out, in]} of those layers. directory: where it was read from."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    kind: str
    directory: pathlib.Path | None = None

    def tokenizer_files(self) -> list[pathlib.Path]:
        """The tokenizer files beside the source's model (copied into a deployed model)."""
        if self.directory is None:
            return []
        return [self.directory / f for f in TOKENIZER_FILES if (self.directory / f).is_file()]


def resolve(path: str | os.PathLike) -> tuple[str, pathlib.Path]:
    """(kind, model directory) of a path: a deployed model, a sparse checkpoint, an exported transformers
    model, or a run directory (its model/, or the one stage of a pipeline run that has one)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / DEPLOYED_WEIGHTS).is_file():
        return "deployed model", path
    if (path / checkpoint.METADATA).is_file():
        return "sparse checkpoint", path
    if (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        return "exported model", path
    if (path / "model").is_dir():
        return resolve(path / "model")
    stages = sorted(d for d in path.iterdir() if d.is_dir() and (d / "model").is_dir()) if path.is_dir() else []
    downstream = [d for d in stages if _stage(d) == "downstream"] or stages
    if len(downstream) == 1:
        return resolve(downstream[0] / "model")
    if downstream:
        raise ValueError(f"{path} holds several models ({', '.join(d.name for d in downstream)}); pass one of them")
    raise ValueError(f"{path} is not a model: expected a sparsebert run directory, a sparse checkpoint "
                     f"({checkpoint.METADATA}), an exported transformers model (config.json + model.safetensors) "
                     f"or a deployed model ({DEPLOYED_WEIGHTS})")


def _stage(run_dir: pathlib.Path) -> str | None:
    try:
        return json.loads((run_dir / "done.json").read_text()).get("stage")
    except (OSError, ValueError):
        return None


def load(source: nn.Module | str | os.PathLike) -> Source:
    """A Source from a model in memory (never modified) or a path (see :func:`resolve`)."""
    if isinstance(source, nn.Module):
        return from_module(source, "model")
    kind, directory = resolve(source)
    model = LOADERS.get(kind, _load_transformers)(directory)
    result = from_module(model, kind)
    result.directory = directory
    return result


def _load_transformers(directory: pathlib.Path) -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(directory)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return (cls or transformers.AutoModel).from_pretrained(directory)


# How each kind of directory loads; files.py adds "deployed model" (it builds on this module).
LOADERS: dict[str, Callable[[pathlib.Path], nn.Module]] = {"sparse checkpoint": checkpoint.load_sparse}


def from_module(model: nn.Module, kind: str) -> Source:
    """MaskedLinear and deployed layers become dense nn.Linear with W * M; in a plain model the encoder
    nn.Linear layers (sparsify's default selection) are the prunable ones, kept where nonzero."""
    plain = copy.deepcopy(model).eval()
    masks: dict[str, torch.Tensor] = {}
    selection = SparsifyConfig()
    with torch.no_grad():
        for name, module in list(plain.named_modules()):
            if isinstance(module, MaskedLinear):
                expected = (module.out_features, (module.in_features + 7) // 8)
                if tuple(module.mask.shape) != expected or module.mask.dtype != torch.uint8:
                    raise ValueError(f"{name}: mask/weight mismatch: a weight of shape {tuple(module.weight.shape)} "
                                     f"needs a bit-packed uint8 mask of shape {expected}, got {module.mask.dtype} "
                                     f"{tuple(module.mask.shape)}")
                keep = module.dense_mask()
                weight = torch.where(keep, module.weight, torch.zeros((), dtype=module.weight.dtype))
                _replace(plain, name, dense_linear(weight, module.bias))
            elif isinstance(module, SparseLinear):
                weight = module.dense_weight()
                keep = module.kept()
                _replace(plain, name, dense_linear(weight, module.bias))
            elif isinstance(module, nn.Linear) and selection.selects(name):
                weight = module.weight
                if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
                    weight = weight.to_dense()
                    _replace(plain, name, dense_linear(weight, module.bias))
                keep = weight != 0
            else:
                continue
            masks[name] = keep
    for attribute in ("sparsebert_config", "sparsebert_deploy"):
        if hasattr(plain, attribute):
            delattr(plain, attribute)
    if not masks:
        raise ValueError(f"the {kind} has no prunable nn.Linear layers (none matches {selection.include})")
    return Source(plain, masks, kind)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
