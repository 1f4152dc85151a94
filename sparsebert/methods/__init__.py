"""Pruning methods, registered by name: see base.Method for the contract with the trainer."""
from ..registry import NotRegistered
from . import baselines, cap, dense, kap, prune_ofa  # noqa: F401  (register)
from ..objectives import model_inputs, task_loss
from .base import METHODS, Method, MethodContext, get_method, register_method
from .recipes import RecipeNotFound, load_recipe

__all__ = ["METHODS", "Method", "MethodContext", "NotRegistered", "RecipeNotFound", "get_method", "load_recipe",
           "model_inputs", "register_method", "task_loss"]
