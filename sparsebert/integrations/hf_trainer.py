"""sparsebert methods in the transformers ``Trainer``.

An existing Trainer script prunes with any method by one of:

* ``PruningTrainer(..., pruning=sparsebert.Pruning(...))`` in place of ``Trainer``: the method's
  optimizer (MaskedAdamW with its param groups; ``optimizers=(opt, None)`` gives yours, turned
  masked), the method's LR schedule (warm-up and decay, Prune OFA's rewinding), its loss from the
  model's outputs (distillation, contrastive terms: ``compute_loss``), an "index" column kept for
  CAP, and the callback below;
* ``Trainer(..., callbacks=[PruningCallback(pruning)])`` for methods whose loss is the task loss and
  that add no parameters (magnitude, one-shot, gradual): the Trainer's own optimizer and schedule
  stay, and pruned weights are re-zeroed after each of its steps (one warning says so).

The callback makes the model sparse when the Trainer is built (so that checkpoints with masks load),
sets the method up when training begins (``state.max_steps``, the training set's size), applies the
pruning schedule after every optimizer step, and writes the method's state into every checkpoint
(``sparsebert_pruning.pt``), from which ``trainer.train(resume_from_checkpoint=...)`` continues.
Checkpoints hold masks and scores; ``pruning.export(dir)`` writes the plain transformers model.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .pruning import Pruning

__all__ = ["STATE_FILE", "PruningCallback", "PruningTrainer"]

#: The method's state in each Trainer checkpoint folder.
STATE_FILE = "sparsebert_pruning.pt"


def _train_size(dataloader: Any) -> int | None:
    dataset = getattr(dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        return None


class PruningCallback(TrainerCallback):
    """Drives a :class:`~sparsebert.Pruning` from the Trainer's events (see the module doc).

    `computes_loss`: the Trainer's ``compute_loss`` returns ``pruning.loss(inputs, outputs)`` (as
    :class:`PruningTrainer`'s does); without it, a method whose loss has more than the task term is
    refused when the Trainer is built, as is one with parameters of its own outside PruningTrainer.
    """

    def __init__(self, pruning: Pruning, *, computes_loss: bool = False):
        self.pruning = pruning
        self.computes_loss = computes_loss
        #: The checkpoint a run resumes from (PruningTrainer.train sets it; else found by the step).
        self.resume_from: str | None = None
        self._in_pruning_trainer = False  # PruningTrainer builds the optimizer and computes the loss

    def on_init_end(self, args, state, control, model=None, **kwargs) -> None:
        method = self.pruning.method
        if not self._in_pruning_trainer and method.adds_parameters:
            raise ValueError(f"method {method.name!r} trains parameters of its own (movement scores) at their own LR, "
                             "which the Trainer's optimizer does not know: use sparsebert.integrations.hf_trainer."
                             "PruningTrainer")
        if not self._in_pruning_trainer and method.adds_loss_terms and not self.computes_loss:
            raise ValueError(f"method {method.name!r} trains with more than the task loss (distillation, contrastive "
                             "terms or penalties): use sparsebert.integrations.hf_trainer.PruningTrainer, or a "
                             "compute_loss that returns pruning.loss(inputs, outputs) with "
                             "PruningCallback(pruning, computes_loss=True)")
        if model is not None:
            self.pruning.adapt(model)  # before train() loads a checkpoint holding masks and scores

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, args: TrainingArguments,
              state: TrainerState, train_size: int | None, *, replace_optimizer: bool) -> torch.optim.Optimizer:
        """Set the method up for a run of `state.max_steps` steps (resuming from the checkpoint of
        `state.global_step` when it is past 0); returns the optimizer to step."""
        resume = None
        if state.global_step > 0:
            folder = pathlib.Path(self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            if not (folder / STATE_FILE).is_file():
                raise FileNotFoundError(f"resuming at step {state.global_step}: no {STATE_FILE} in {folder} (a checkpoint "
                                        "saved without sparsebert's PruningCallback cannot continue a pruning run)")
            resume = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        _, optimizer = self.pruning.prepare(model, optimizer, lr=args.learning_rate, weight_decay=args.weight_decay,
                                            total_steps=state.max_steps, train_size=train_size, resume=resume,
                                            replace_optimizer=replace_optimizer)
        return optimizer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None,
                       **kwargs) -> None:
        if self.pruning.model is None:  # (PruningTrainer set it up already, with its optimizer)
            self.start(model, optimizer, args, state, _train_size(train_dataloader), replace_optimizer=False)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.pruning.step()

    def on_save(self, args, state, control, **kwargs) -> None:
        folder = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.pruning.state_dict(), folder / STATE_FILE)


class PruningTrainer(Trainer):
    """A transformers Trainer that trains with a sparsebert method: its optimizer, LR schedule and
    loss (see the module doc). Takes every Trainer argument, plus `pruning`."""

    def __init__(self, *args: Any, pruning: Pruning, **kwargs: Any):
        self.pruning = pruning
        self.pruning_callback = PruningCallback(pruning, computes_loss=True)
        self.pruning_callback._in_pruning_trainer = True
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.pruning_callback]
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self.pruning_callback.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if self.pruning.model is None:
            if self.optimizer is not None and self.lr_scheduler is not None:
                raise ValueError("PruningTrainer builds the masked optimizer before the LR scheduler: pass "
                                 "optimizers=(optimizer, None), and the method's schedule applies")
            train_size = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
            self.optimizer = self.pruning_callback.start(self.model, self.optimizer, self.args, self.state, train_size,
                                                         replace_optimizer=True)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = self.pruning.lr_scheduler(optimizer or self.optimizer)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not model.training:  # evaluation: the task loss, and no writes into CAP's memory banks
            inputs = {k: v for k, v in inputs.items() if k != "index"}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{k: v for k, v in inputs.items() if k != "index"})
        loss = self.pruning.loss(inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "index" not in self._signature_columns:  # CAP's memory banks are keyed by example index
            self._signature_columns.append("index")
