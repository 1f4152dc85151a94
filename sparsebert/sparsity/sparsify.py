"""Swap chosen nn.Linear modules of a transformers encoder for MaskedLinear, in place."""
from __future__ import annotations

import dataclasses
import re

from torch import nn

from ..distributed import is_sharded
from ..families import encoder_matrices_regex
from .modules import MaskedLinear


@dataclasses.dataclass
class SparsifyConfig:
    """Which nn.Linear modules sparsify() replaces (regexes over qualified names), and movement scores."""

    # Default: the six encoder matrices of every layer of every model family (sparsebert.families);
    # embeddings, pooler and classifier stay dense unless a config includes them.
    include: list[str] = dataclasses.field(default_factory=lambda: [encoder_matrices_regex()])
    exclude: list[str] = dataclasses.field(default_factory=list)
    scores: bool = False  # add movement scores
    score_init: float = 0.0  # Sanh et al.'s constant init (mask_scale 0)

    @classmethod
    def coerce(cls, config: "SparsifyConfig | dict | None") -> "SparsifyConfig":
        """A config from None (the defaults), a dict of its fields (a string include/exclude is one regex)
        or a config."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sparsify config keys {sorted(unknown)}")
        config = dict(config)
        for key in ("include", "exclude"):
            if isinstance(config.get(key), str):
                config[key] = [config[key]]
        return cls(**config)

    def to_dict(self) -> dict:
        """The fields as a dict (stored on the model and in sparse checkpoints)."""
        return dataclasses.asdict(self)

    def selects(self, name: str) -> bool:
        """Whether the module with this qualified name is included and not excluded."""
        return any(re.search(p, name) for p in self.include) and not any(re.search(p, name) for p in self.exclude)


def sparsify(model: nn.Module, config: SparsifyConfig | dict | None = None) -> dict[str, MaskedLinear]:
    """Replace the selected nn.Linear modules by MaskedLinear (sharing their Parameters).

    Returns {qualified name: MaskedLinear}. Idempotent: already masked modules are kept (and returned).
    The config is stored on the model as `sparsebert_config` for checkpoints.
    """
    config = SparsifyConfig.coerce(config)
    selected = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and config.selects(n)]
    if not selected:
        raise ValueError(f"sparsify: no nn.Linear module matches {config.include}")
    sharded = [n for n, m in selected if not isinstance(m, MaskedLinear) and is_sharded(m.weight)]
    if sharded:
        raise ValueError(f"sparsify: {sharded[0]} is already sharded by FSDP2 (fully_shard): sparsify the model (or "
                         "set the pruning method up) first, then fully_shard it")
    for name, module in selected:
        if isinstance(module, MaskedLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = MaskedLinear.from_linear(module, scores=config.scores)
        if new.scores is not None:
            new.scores.data.fill_(config.score_init)
        setattr(parent, child, new)
    model.sparsebert_config = config.to_dict()
    return masked_modules(model)


def masked_modules(model: nn.Module) -> dict[str, MaskedLinear]:
    """{qualified name: MaskedLinear} of every masked module of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}
