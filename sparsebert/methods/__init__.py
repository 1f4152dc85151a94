"""Pruning methods, registered by name: see base.Method for the contract with the trainer."""
from . import dense  # noqa: F401  (registers)
from .base import METHODS, Method, MethodContext, get_method, model_inputs, register_method, task_loss

__all__ = ["METHODS", "Method", "MethodContext", "get_method", "model_inputs", "register_method", "task_loss"]
