"""Pruning: one object that brings a sparsebert method into any PyTorch training loop.

    pruning = sparsebert.Pruning("sparsebert-kap", sparsity=0.9, teacher=teacher, total_steps=steps)
    model, optimizer = pruning.prepare(model, optimizer)       # sparsify, masks, MaskedAdamW
    for batch in loader:
        outputs = model(**inputs)                                # your forward, unchanged
        loss = pruning.loss(batch, outputs)                      # + distillation / contrastive terms
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        pruning.step()                                           # pruning events, snapshots

The method (sparsebert.methods) does the work: `prepare` runs its setup on the model, builds its
optimizer or turns yours into a masked one, and makes the model's forward return what the method's
loss reads (hidden states, attentions) while training; `loss` adds the method's terms to the outputs
the loop already has; `step` applies the pruning schedule. Methods whose loss is the task loss alone
(magnitude pruning, one-shot, gradual) need no `loss` call: the model's own `outputs.loss` is it.
"""
from __future__ import annotations

import copy
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..methods import Method, MethodContext, get_method, load_recipe
from ..methods.recipes import load_recipe_file
from ..optim import MaskedAdamW, MaskedSGD, MaskedOptimizer
from ..sparsity import export_dense, sparsity_report

__all__ = ["Pruning", "infer_objective"]

# Keys of torch.optim.AdamW / SGD groups with no masked counterpart (implementation choices), dropped on conversion.
_TORCH_ONLY = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay", "amsgrad")


def infer_objective(model: nn.Module) -> str:
    """The objective a transformers model trains for, from its head: "mlm" (…ForMaskedLM),
    "classification"/"regression" (…ForSequenceClassification, by num_labels/problem_type) or
    "representation" (a bare encoder, …Model)."""
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        return "mlm"
    if name.endswith("ForSequenceClassification"):
        config = model.config
        regression = config.num_labels == 1 or getattr(config, "problem_type", None) == "regression"
        return "regression" if regression else "classification"
    if name.endswith("Model"):
        return "representation"
    raise ValueError(f"cannot tell the objective of a {name}: pass objective= (classification, regression, mlm or "
                     "representation)")


def _recipe_method(recipe: str | os.PathLike | Mapping) -> dict:
    """A recipe's `method:` section: from a YAML file, a "method/stage" recipe shipped with sparsebert,
    a recipe dict, or a method section itself ({"name": ..., **options})."""
    if isinstance(recipe, Mapping):
        data = dict(recipe)
    elif pathlib.Path(recipe).is_file():
        data = load_recipe_file(recipe)
    elif isinstance(recipe, str) and recipe.count("/") == 1 and not recipe.endswith((".yaml", ".yml")):
        data = load_recipe(*recipe.split("/"))
    else:
        raise FileNotFoundError(f"no recipe file {recipe} (a shipped recipe is named 'method/stage', e.g. 'cap/downstream')")
    section = dict(data.get("method") or {}) if "method" in data else data
    if "name" not in section:
        raise ValueError(f"recipe {recipe if not isinstance(recipe, Mapping) else '(dict)'}: the method section has no name")
    return section


def _merge(base: dict, overrides: dict) -> dict:
    """Recipe options with overrides; a nested section (distill:, contrastive:) is updated, not replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _frozen(model: nn.Module | None, device: torch.device) -> nn.Module | None:
    return None if model is None else model.to(device).eval().requires_grad_(False)


class Pruning:
    """A sparsebert method (by name, with its options, or a built `Method`) and the hooks a training
    loop calls. `teacher` (fine-tuned dense model) and `pretrained` (pre-trained encoder, CAP) are
    frozen and moved to the student's device by `prepare`. `total_steps` (optimizer steps of the run)
    and `train_size` (examples; CAP's memory banks) may also be given to `prepare`; `objective` is
    inferred from the model's head unless given. A method that needs a model it was not given is
    refused here, before anything is loaded or changed."""

    def __init__(self, method: str | Method = "gradual-magnitude", *, teacher: nn.Module | None = None,
                 pretrained: nn.Module | None = None, total_steps: int | None = None, train_size: int | None = None,
                 objective: str | None = None, **options: Any):
        if isinstance(method, Method):
            if options:
                raise ValueError(f"options {sorted(options)} go to a method built by name; this one is built already")
            self.method = method
        else:
            self.method = get_method(method, **options)
        missing = sorted(role for role, model in (("teacher", teacher), ("pretrained", pretrained))
                         if role in self.method.needs() and model is None)
        if missing:
            raise ValueError(f"method {self.method.name!r} trains against the {' and '.join(missing)} model: pass "
                             + " and ".join(f"{role}=" for role in missing))
        self.teacher, self.pretrained = teacher, pretrained
        self.total_steps, self.train_size, self.objective = total_steps, train_size, objective
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        #: Optimizer steps completed (the `step` the method's hooks get next).
        self.step_count = 0
        #: The last loss terms and pruning events, for logging.
        self.logs: dict[str, float] = {}
        self._loss_called = False
        self._hook = None

    @classmethod
    def from_recipe(cls, recipe: str | os.PathLike | Mapping, *, teacher: nn.Module | None = None,
                    pretrained: nn.Module | None = None, total_steps: int | None = None,
                    train_size: int | None = None, objective: str | None = None, **overrides: Any) -> "Pruning":
        """The method of a recipe: a YAML file, a shipped recipe named "method/stage" (e.g.
        "cap/downstream"), or a dict (a whole recipe or its `method:` section), with `overrides` of its
        options (nested sections such as `distill` are updated key by key)."""
        section = _recipe_method(recipe)
        name = section.pop("name")
        return cls(name, teacher=teacher, pretrained=pretrained, total_steps=total_steps, train_size=train_size,
                   objective=objective, **_merge(section, overrides))

    # --- preparing ----------------------------------------------------------------------------------
    def adapt(self, model: nn.Module) -> nn.Module:
        """Give `model` the method's architecture (MaskedLinear modules, ...) now, without pruning: for a
        loop that loads a checkpoint of the pruned model before `prepare`. Idempotent; returns model."""
        self.method.adapt(model)
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, lr: float | None = None,
                weight_decay: float = 0.01, total_steps: int | None = None, train_size: int | None = None,
                resume: Mapping | None = None, replace_optimizer: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Set the method up on `model` (in place: sparsify, the pruning at step 0) and return the model
        and the optimizer to step. Without `optimizer`: the method's own (MaskedAdamW with its param
        groups) at `lr` and `weight_decay`. A fresh torch.optim.AdamW or SGD is replaced by the
        MaskedAdamW/MaskedSGD with the same groups and settings, a masked optimizer gets the masks; any
        other optimizer is kept (pruned weights are then re-zeroed after its steps, with a warning).
        Parameters the method adds (movement scores) join the optimizer in their own group. Call it
        before building an LR scheduler on the optimizer (or use :meth:`lr_scheduler`).
        `replace_optimizer=False` keeps the very optimizer object given (for a loop that holds it).

        `resume`: a :meth:`state_dict` saved with a checkpoint whose model state `model` already holds
        (call :meth:`adapt` before loading it): weights, masks and scores stay as loaded."""
        if self.model is not None:
            raise RuntimeError("Pruning.prepare: already prepared (one Pruning object serves one training run)")
        total_steps = total_steps or self.total_steps
        if not total_steps:
            raise ValueError("Pruning.prepare needs total_steps (the optimizer steps of the run): pruning schedules "
                             "are fractions of it")
        train_size = train_size or self.train_size
        if getattr(self.method, "contrastive_config", None) is not None and not train_size:
            raise ValueError(f"method {self.method.name!r} keeps memory banks over the training set: pass "
                             "train_size=len(train_dataset) (and batches with 'index')")
        if optimizer is None and lr is None:
            raise ValueError("Pruning.prepare: pass your optimizer, or lr= for the method's own")
        param = next(model.parameters())
        objective = self.objective or infer_objective(model)
        num_labels = model.config.num_labels if objective in ("classification", "regression") else 0
        ctx = MethodContext(student=model, teacher=_frozen(self.teacher, param.device),
                            pretrained=_frozen(self.pretrained, param.device), objective=objective,
                            num_labels=num_labels, total_steps=int(total_steps), steps_per_epoch=int(total_steps),
                            train_size=int(train_size or 0), device=param.device)
        loaded = None
        if resume is not None:
            self.method.adapt(model)
            loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.method.setup(ctx)
        if resume is not None:
            model.load_state_dict(loaded)
            self.load_state_dict(resume)
        self.model, self.optimizer = model, self._optimizer(optimizer, lr, weight_decay, replace_optimizer)
        if self.method.forward_kwargs():
            self._hook = model.register_forward_pre_hook(self._forward_kwargs, with_kwargs=True)
        return model, self.optimizer

    def _forward_kwargs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if module.training and torch.is_grad_enabled():
            return args, {**kwargs, **self.method.forward_kwargs()}
        return None

    def _optimizer(self, optimizer: torch.optim.Optimizer | None, lr: float | None, weight_decay: float,
                   replace: bool) -> torch.optim.Optimizer:
        method = self.method
        if optimizer is None:
            return method.optimizer(lr, weight_decay)
        if getattr(method, "lr_scales", None):
            raise ValueError(f"method {method.name!r} sets lr_scales, which only its own optimizer applies: call "
                             "prepare(model, lr=...) without an optimizer")
        masks = method.optimizer_masks()
        if replace and type(optimizer) in (torch.optim.AdamW, torch.optim.SGD) and not optimizer.state:
            optimizer = self._masked_twin(optimizer)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for group in method.added_param_groups():
            group = {**group, "params": [p for p in group["params"] if id(p) not in present]}
            if group["params"]:
                optimizer.add_param_group(group)
        if isinstance(optimizer, MaskedOptimizer):
            for weight, mask in masks.items():
                if id(weight) in present:
                    optimizer.set_mask(weight, mask)
        method.watch(optimizer)
        return optimizer

    @staticmethod
    def _masked_twin(optimizer: torch.optim.Optimizer) -> MaskedOptimizer:
        """The MaskedAdamW/MaskedSGD with the groups and settings of a fresh torch AdamW/SGD."""
        if any(group.get("amsgrad") for group in optimizer.param_groups):
            raise ValueError("Pruning.prepare: AdamW(amsgrad=True) has no masked counterpart; use amsgrad=False")
        groups = [{k: v for k, v in group.items() if k not in _TORCH_ONLY} for group in optimizer.param_groups]
        cls = MaskedAdamW if isinstance(optimizer, torch.optim.AdamW) else MaskedSGD
        return cls(groups, lr=groups[0]["lr"])

    # --- the loop's hooks ----------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any], outputs: Any) -> torch.Tensor:
        """The method's training loss from the student's `outputs` on `batch` (which holds the model's
        inputs, "labels", and "index" for contrastive methods): the task loss plus the method's terms."""
        self._check_prepared("loss")
        loss, logs = self.method.loss_from_outputs(dict(batch), outputs, self.step_count)
        self.logs, self._loss_called = dict(logs), True
        return loss

    def step(self) -> dict[str, float]:
        """After `optimizer.step()`: the method's per-step update (pruning events, snapshots). Returns
        what happened (e.g. {"sparsity": ..., "target": ...} at a pruning event)."""
        self._check_prepared("step")
        if self.method.adds_loss_terms and not self._loss_called:
            raise RuntimeError(f"method {self.method.name!r} trains with more than the task loss (distillation, "
                               "contrastive terms or penalties): compute the loss with pruning.loss(batch, outputs) "
                               "before optimizer.step()")
        events = dict(self.method.after_step(self.step_count) or {})
        self.step_count += 1
        self._loss_called = False
        self.logs.update(events)
        return events

    def lr_at(self, step: int, base_lr: float) -> float:
        """The method's LR at `step` for a base LR (warm-up, decay, Prune OFA's rewinding)."""
        self._check_prepared("lr_at")
        return self.method.lr_at(step, base_lr)

    def lr_scheduler(self, optimizer: torch.optim.Optimizer | None = None) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR that follows the method's schedule, scaling every group's own LR; step it after
        every optimizer step."""
        self._check_prepared("lr_scheduler")
        return torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lambda step: self.method.lr_at(step, 1.0))

    def _check_prepared(self, what: str) -> None:
        if self.model is None:
            raise RuntimeError(f"Pruning.{what}: call prepare(model, optimizer) first")

    # --- state and results ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beside the model's and optimizer's state (masks and scores are in
        the model's state_dict): the step and the method's state (pruning events, memory banks)."""
        return {"step": self.step_count, "method": self.method.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (after prepare, with the model state of the same checkpoint)."""
        self.method.load_state_dict(dict(state["method"]))
        self.step_count = int(state["step"])

    def report(self) -> dict:
        """sparsebert.sparsity.sparsity_report of the model: kept weights per matrix, layer and role."""
        self._check_prepared("report")
        return sparsity_report(self.model)

    def export(self, directory: str | os.PathLike, *, tokenizer: Any = None) -> pathlib.Path:
        """The pruned model as a plain transformers checkpoint (pruned weights stored as zeros), which
        loads without sparsebert."""
        self._check_prepared("export")
        return export_dense(self.model, directory, tokenizer=tokenizer)

    def close(self) -> None:
        """Stop adding the method's forward arguments to the model's training forward."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
