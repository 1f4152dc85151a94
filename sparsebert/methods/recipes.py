"""Recipes: recipes/<method>/<stage>.yaml, one per pipeline stage (schema in recipes/README.md)."""
from __future__ import annotations

import os
import pathlib

import yaml

SECTIONS = {"method", "training", "models", "description"}


class RecipeNotFound(FileNotFoundError):
    """No recipe file for a (method, stage)."""
MODEL_ROLES = {"student", "teacher", "pretrained"}


def recipes_dir() -> pathlib.Path:
    """$SPARSEBERT_RECIPES, else recipes/ beside the package (source checkout, editable install), else
    ./recipes (a wheel installed from a checkout, run from its root)."""
    env = os.environ.get("SPARSEBERT_RECIPES")
    if env:
        return pathlib.Path(env)
    beside = pathlib.Path(__file__).resolve().parents[2] / "recipes"
    return beside if beside.is_dir() else pathlib.Path.cwd() / "recipes"


def load_recipe(method: str, stage: str, *, root: str | os.PathLike | None = None) -> dict:
    """The recipe as a dict: {"method": {"name", **kwargs}, "training": {...}, "models": {...}}.
    Validated: known sections, method name matching its folder and registered, kwargs accepted."""
    from .base import get_method

    path = pathlib.Path(root or recipes_dir()) / method / f"{stage}.yaml"
    if not path.is_file():
        raise RecipeNotFound(f"no recipe {path}")
    recipe = yaml.safe_load(path.read_text()) or {}
    unknown = set(recipe) - SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected {sorted(SECTIONS)}")
    spec = dict(recipe.get("method") or {})
    if spec.get("name") != method:
        raise ValueError(f"{path}: method.name is {spec.get('name')!r}, expected {method!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    get_method(method, **kwargs)  # raises on unknown or invalid options
    models = recipe.get("models") or {}
    if set(models) - MODEL_ROLES:
        raise ValueError(f"{path}: unknown model roles {sorted(set(models) - MODEL_ROLES)}")
    return {"method": spec, "training": dict(recipe.get("training") or {}), "models": dict(models),
            "description": recipe.get("description", "")}
