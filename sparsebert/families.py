"""Model families: where a transformers encoder keeps its layers and their prunable matrices.

One entry per family. Sparsify (which matrices are pruned by default), the structured pattern
(heads and FFN neurons), the small-dense baseline (the layer list) and the sparsity report
(layer and matrix of each weight) all read this table; adding a family is one `FAMILIES.register`.
"""
from __future__ import annotations

import dataclasses
import re

from torch import nn

from .registry import Registry

__all__ = ["FAMILIES", "ROLES", "Family", "UnknownFamily", "encoder_matrices_regex", "family_of", "matrix_role"]

#: The six prunable matrices of an encoder layer, by role.
ROLES = ("query", "key", "value", "attn-out", "ffn-in", "ffn-out")


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a transformers model family keeps its encoder layers and their six prunable matrices."""

    name: str
    model_types: tuple[str, ...]  # transformers `config.model_type` values of the family
    layers: str                   # path of the encoder's layer ModuleList inside the base model
    embeddings: str               # path of the embeddings module inside the base model
    matrices: dict[str, str]      # role (ROLES) -> path of its nn.Linear inside a layer

    def __post_init__(self):
        if tuple(self.matrices) != ROLES:
            raise ValueError(f"family {self.name!r}: matrices must name the roles {ROLES} in that order")

    @property
    def pattern(self) -> str:
        """Regex over qualified module names: the family's encoder matrices (group 1: layer index)."""
        paths = "|".join(re.escape(p) for p in self.matrices.values())
        return rf"(?:^|\.){re.escape(self.layers)}\.(\d+)\.({paths})$"

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        """The model's encoder layers."""
        return _base(model).get_submodule(self.layers)

    def set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the model's encoder layers (in place)."""
        parent, _, attr = self.layers.rpartition(".")
        base = _base(model)
        setattr(base.get_submodule(parent) if parent else base, attr, layers)


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


FAMILIES: Registry[Family] = Registry("model family")

_BERT_MATRICES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                  "attn-out": "attention.output.dense", "ffn-in": "intermediate.dense", "ffn-out": "output.dense"}
FAMILIES.register("bert")(Family("bert", ("bert",), "encoder.layer", "embeddings", _BERT_MATRICES))
FAMILIES.register("roberta")(Family("roberta", ("roberta", "xlm-roberta"), "encoder.layer", "embeddings", _BERT_MATRICES))
FAMILIES.register("distilbert")(Family(
    "distilbert", ("distilbert",), "transformer.layer", "embeddings",
    {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin", "attn-out": "attention.out_lin",
     "ffn-in": "ffn.lin1", "ffn-out": "ffn.lin2"}))


class UnknownFamily(ValueError):
    """A model whose family has no entry in the table."""


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model, by its config's model_type."""
    return family_of_type(getattr(getattr(model, "config", None), "model_type", None), type(model).__name__)


def family_of_type(model_type: str | None, what: str = "") -> Family:
    """The family answering to a transformers `config.model_type`."""
    families = [FAMILIES.get(n) for n in FAMILIES.names()]
    for family in families:
        if model_type in family.model_types:
            return family
    raise UnknownFamily(f"no model family answers to model_type {model_type!r}{f' ({what})' if what else ''}; known: "
                        f"{', '.join(t for f in families for t in f.model_types)}. Add one in sparsebert/families.py")


def encoder_matrices_regex() -> str:
    """One regex for the encoder matrices of every registered family (the default pruning targets)."""
    return "|".join(f"(?:{FAMILIES.get(n).pattern})" for n in FAMILIES.names())


def matrix_role(name: str) -> tuple[int, str] | None:
    """(layer index, role) of a qualified module name that is an encoder matrix, else None."""
    for family in (FAMILIES.get(n) for n in FAMILIES.names()):
        found = re.search(family.pattern, name)
        if found:
            role = next(r for r, p in family.matrices.items() if p == found.group(2))
            return int(found.group(1)), role
    return None
