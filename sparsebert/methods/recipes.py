"""Recipes: one YAML file per method and pipeline stage, shipped inside the package as
`sparsebert/recipes/<method>/<stage>.yaml` (schema in sparsebert/recipes/README.md), or a user's
own file. Every recipe is validated when loaded: known sections and model roles, a registered
method, and options its constructor accepts."""
from __future__ import annotations

import os
import pathlib
from importlib import resources

import yaml

from .base import METHODS, get_method

SECTIONS = {"method", "training", "models", "description"}
MODEL_ROLES = {"student", "teacher", "pretrained"}


class RecipeNotFound(FileNotFoundError):
    """No recipe file for a (method, stage), or no such recipe file."""


def recipes_dir():
    """The recipes shipped with the package (a Traversable; a directory in every install)."""
    return resources.files("sparsebert") / "recipes"


def recipe_names(method: str) -> list[str]:
    """The stages (recipe names) the library ships a recipe for, for `method`."""
    folder = recipes_dir() / method
    if not folder.is_dir():
        return []
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(method: str, stage: str) -> dict:
    """The library's recipe of `method` for `stage` (or a named variant such as downstream-qat):
    {"method": {"name", **kwargs}, "training": {...}, "models": {...}, "description": str}."""
    METHODS.get(method)  # NotRegistered for an unknown method
    path = recipes_dir() / method / f"{stage}.yaml"
    if not path.is_file():
        shipped = recipe_names(method)
        raise RecipeNotFound(f"no recipe recipes/{method}/{stage}.yaml"
                             + (f"; {method} has {', '.join(shipped)}" if shipped else f"; {method} ships no recipes"))
    recipe = _parse(path.read_text(encoding="utf-8"), f"recipes/{method}/{stage}.yaml")
    if recipe["method"].get("name") != method:
        raise ValueError(f"recipes/{method}/{stage}.yaml: method.name is {recipe['method'].get('name')!r}, "
                         f"expected {method!r}")
    return recipe


def load_recipe_file(path: str | os.PathLike) -> dict:
    """A user's own recipe file, validated like the shipped ones; its method.name names the method."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise RecipeNotFound(f"recipe file {path} does not exist")
    recipe = _parse(path.read_text(encoding="utf-8"), str(path))
    if not recipe["method"].get("name"):
        raise ValueError(f"{path}: the recipe needs method.name")
    return recipe


def _parse(text: str, where: str) -> dict:
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{where}: a recipe is a mapping of sections {sorted(SECTIONS)}")
    unknown = set(recipe) - SECTIONS
    if unknown:
        raise ValueError(f"{where}: unknown sections {sorted(unknown)}; expected {sorted(SECTIONS)}")
    spec = dict(recipe.get("method") or {})
    models = dict(recipe.get("models") or {})
    if set(models) - MODEL_ROLES:
        raise ValueError(f"{where}: unknown model roles {sorted(set(models) - MODEL_ROLES)}")
    if spec.get("name"):
        get_method(spec["name"], **{k: v for k, v in spec.items() if k != "name"})  # unknown/invalid options
    return {"method": spec, "training": dict(recipe.get("training") or {}), "models": models,
            "description": recipe.get("description", "")}
