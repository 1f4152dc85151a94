"""The training loop, reusable by any caller: a method, a model, features and a batch function, and
a list of callbacks that add everything else (metrics, evaluation, checkpoints and resume, progress,
the test kill hook; see callbacks.py).

Each step: the epoch's deterministic order gives the batch, every param group's LR is set to
`method.lr_at(step, lr)` (optimizers apply a group's own `lr_scale`), the method's loss is
back-propagated (mixed precision as asked), gradients are clipped, the optimizer steps, then
`method.after_step(step)` (pruning events). Callbacks run in list order.

Under torchrun (see distributed.py) every rank runs this loop on its rows of the same global batch
(`training.batch_size`), its losses averaged over the global batch (sparsebert.distributed.
global_batch), and logs the global loss.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import torch

from .. import distributed as D
from ..data.order import epoch_order
from .distributed import Dist, current, mean_over_ranks, take_rows
from .runtime import autocast, move, seed_everything


def schedule(train_size: int, training: dict, budget_size: int | None = None) -> tuple[int, int]:
    """(steps_per_epoch, total_steps): an epoch visits the training set once; the budget is
    `max_steps`, else `epochs` passes over `budget_size` examples (the set before augmentation;
    default the training set), raised to `min_steps` for small tasks."""
    bs = training["batch_size"]
    steps_per_epoch = max(1, math.ceil(train_size / bs))
    budget = math.ceil(training["epochs"] * math.ceil((budget_size or train_size) / bs))
    total = training["max_steps"] or max(1, budget, training.get("min_steps") or 0)
    return steps_per_epoch, int(total)


@dataclasses.dataclass
class StepLog:
    """What a step reports to the callbacks."""
    step: int                 # steps completed, this one included
    loss: float
    lr: float
    logs: dict[str, float]    # the method's loss terms
    events: dict[str, float]  # the method's after_step report (pruning events); empty when nothing happened


class Callback:
    """Hooks of the loop; each gets the trainer. State returned by state_dict() is saved with checkpoints."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", log: StepLog) -> None: ...
    def on_evaluate(self, trainer: "Trainer", record: dict) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


class Trainer:
    def __init__(self, *, method, model: torch.nn.Module, train_features: list, make_batch: Callable[[list, int], dict],
                 training: dict, total_steps: int, steps_per_epoch: int, device: torch.device, precision: str = "fp32",
                 evaluate: Callable[[], dict] | None = None, callbacks: Sequence[Callback] = (), label: str = "train",
                 started: float | None = None, dist: Dist | None = None):
        self.method, self.model = method, model
        self.train_features, self.make_batch, self._evaluate = train_features, make_batch, evaluate
        self.training = training
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.device, self.precision = device, precision
        self.callbacks = list(callbacks)
        self.label = label
        self.dist = current() if dist is None else dist
        self.optimizer = method.optimizer(training["lr"], training["weight_decay"])
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.step = 0
        self.evals: list[dict] = []
        self.stopped: str | None = None  # why a callback ended training before total_steps
        self.started = time.time() if started is None else started  # this invocation's clock
        self.earlier_s = 0.0  # seconds of the invocations before a resume, up to their checkpoint

    def elapsed(self) -> float:
        """Seconds this training has taken, over every invocation (a resumed run included)."""
        return self.earlier_s + time.time() - self.started

    def state_dict(self) -> dict:
        return {"step": self.step, "evals": self.evals, "epoch": self.step // self.steps_per_epoch,
                "time_s": self.elapsed(), "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.evals, self.earlier_s = state["step"], state["evals"], state.get("time_s", 0.0)
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            cb.load_state_dict(saved.get(type(cb).__name__, {}))

    def evaluate(self) -> dict:
        """Evaluate now; callbacks get the record {kind: eval, step, **metrics}."""
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.precision):
            metrics = self._evaluate()
        self.model.train()
        record = {"kind": "eval", "step": self.step, **metrics}
        self.evals.append(record)
        for cb in self.callbacks:
            cb.on_evaluate(self, record)
        return record

    def fit(self) -> dict:
        """Train to total_steps (from where a callback restored the run), or until a callback sets
        `stopped`; returns the evaluation of the last step."""
        seed_everything(self.training["seed"])
        self.model.train()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        bs = self.training["batch_size"]
        lengths = [len(f["input_ids"]) for f in self.train_features] if self.training["group_by_length"] else None
        order, order_epoch = None, -1
        while self.step < self.total_steps and self.stopped is None:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(self.train_features), self.training["seed"], epoch, lengths, bs), epoch
            idx = order[pos * bs:(pos + 1) * bs].tolist()
            # every rank collates the global batch (its padding, its MLM corruption) and keeps its rows
            rows, sizes = self.dist.split(len(idx))
            batch = take_rows(self.make_batch([self.train_features[i] for i in idx], self.step), rows, len(idx))
            log = self._step(move(batch, self.device), sizes)
            for cb in self.callbacks:
                cb.on_step_end(self, log)
        if self._evaluate is not None and (not self.evals or self.evals[-1]["step"] != self.step):
            self.evaluate()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.evals[-1] if self.evals else {}

    def _step(self, batch: dict, sizes: list[int]) -> StepLog:
        lr = self.method.lr_at(self.step, self.training["lr"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision), D.global_batch(sizes[self.dist.rank], sizes=sizes):
            loss, logs = self.method.training_loss(batch, self.step)
        loss_value, *terms = mean_over_ranks([loss.item(), *logs.values()])
        logs = dict(zip(logs, terms))
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"[{self.label}] loss is {loss_value} at step {self.step}")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.training["grad_clip"]:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.training["grad_clip"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        events = self.method.after_step(self.step) or {}
        self.step += 1
        return StepLog(self.step, loss_value, lr, {k: float(v) for k, v in logs.items()},
                       {k: float(v) for k, v in events.items()})
