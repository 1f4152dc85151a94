"""Deploying pruned models: compressed files and a sparse inference runtime.

    model = sparsebert.deploy.convert(pruned)            # or a run dir / sparse checkpoint / exported model
    sparsebert.deploy.save_pretrained(model, "deployed")  # compressed safetensors, hashed, versioned
    model = sparsebert.deploy.from_pretrained("deployed")

``python -m sparsebert.deploy convert|bench`` does the same from the command line (see docs/DEPLOY.md).
"""
from .convert import KERNELS, LayerPlan, convert
from .files import DeployFormatError, from_pretrained, read_metadata, save_pretrained
from .modules import SparseLinear
from .sources import Source, load as load_source, resolve

__all__ = ["KERNELS", "DeployFormatError", "LayerPlan", "Source", "SparseLinear", "convert", "from_pretrained",
           "load_source", "read_metadata", "resolve", "save_pretrained"]
