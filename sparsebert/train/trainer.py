"""The training loop: deterministic data order, LR from the method, mixed precision, periodic
evaluation and checkpoints, exact resume (model, optimizer, method state, RNG, data position)."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..data.order import epoch_order
from .runs import Run, kill_hook


def schedule(train_size: int, training: dict) -> tuple[int, int]:
    """(steps_per_epoch, total_steps) of a training set under a config."""
    steps_per_epoch = max(1, math.ceil(train_size / training["batch_size"]))
    total = training["max_steps"] or max(1, math.ceil(training["epochs"] * steps_per_epoch))
    return steps_per_epoch, int(total)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Trainer:
    def __init__(self, *, cfg: dict, run: Run, method, model: torch.nn.Module, train_features: list,
                 make_batch: Callable[[list, int], dict], evaluate: Callable[[], dict],
                 device: torch.device, steps_per_epoch: int, total_steps: int, label: str = ""):
        self.cfg, self.run, self.method, self.model = cfg, run, method, model
        self.t = cfg["training"]
        self.train_features = train_features
        self.make_batch, self.evaluate = make_batch, evaluate
        self.device = device
        self.precision = cfg["run"]["precision"]
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.eval_every = self.t["eval_every"] or steps_per_epoch
        self.label = label or cfg["stage"]
        self.optimizer = method.optimizer(self.t["lr"], self.t["weight_decay"])
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.step = 0
        self.evals: list[dict] = []
        self.running: list[float] = []  # train losses since the last log line

    def resume(self) -> bool:
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:  # killed before its first checkpoint: start over, forgetting what it logged
            self.run.truncate_metrics(0)
            return False
        state = Run.load_checkpoint(ckpt, self.model, self.optimizer, self.method, self.scaler)
        self.step = state["step"]
        self.evals = state.get("evals", [])
        self.running = state.get("running", [])
        self.run.truncate_metrics(self.step)
        tqdm.write(f"[{self.label}] resumed from {ckpt} at step {self.step}/{self.total_steps}")
        return True

    def checkpoint(self) -> None:
        self.run.save_checkpoint(self.step, self.model, self.optimizer, self.method,
                                 {"evals": self.evals, "running": self.running, "epoch": self.step // self.steps_per_epoch,
                                  "position": self.step % self.steps_per_epoch},
                                 keep=self.t["keep_checkpoints"], scaler=self.scaler)

    def _do_eval(self, started: float, start_step: int) -> dict:
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.precision):
            result = self.evaluate()
        self.model.train()
        record = {"kind": "eval", "step": self.step, **result}
        self.run.log(record)
        self.evals.append(record)
        done = self.step - start_step
        eta = (time.time() - started) / done * (self.total_steps - self.step) if done else 0.0
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        tqdm.write(f"[{self.label}] step {self.step}/{self.total_steps} eval: {shown} | ETA {fmt_seconds(eta)}")
        return record

    def fit(self) -> dict:
        n = len(self.train_features)
        bs = self.t["batch_size"]
        seed = self.t["seed"]
        self.model.train()
        start_step = self.step
        started = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.label, unit="step", dynamic_ncols=True,
                   mininterval=2.0)
        order, order_epoch = None, -1
        lengths = [len(f["input_ids"]) for f in self.train_features] if self.t["group_by_length"] else None
        while self.step < self.total_steps:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(n, seed, epoch, lengths, bs), epoch
            idx = order[pos * bs:(pos + 1) * bs].tolist()
            batch = move(self.make_batch([self.train_features[i] for i in idx], self.step), self.device)
            lr = self.method.lr_at(self.step, self.t["lr"])
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with autocast(self.device, self.precision):
                loss, logs = self.method.training_loss(batch, self.step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{self.label}] loss is {loss.item()} at step {self.step}")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.t["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], self.t["grad_clip"])
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            events = self.method.after_step(self.step) or {}
            self.step += 1
            self.running.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{self.running[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)
            if self.step % self.t["log_every"] == 0 or events or self.step == self.total_steps:
                self.run.log({"kind": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                              "loss": sum(self.running) / len(self.running), "lr": lr,
                              **{k: float(v) for k, v in logs.items()}, **{k: float(v) for k, v in events.items()}})
                self.running = []
            if self.step % self.eval_every == 0 or self.step == self.total_steps:
                self._do_eval(started, start_step)
            if self.step % self.t["checkpoint_every"] == 0 or self.step == self.total_steps:
                self.checkpoint()
            kill_hook("step", self.step, self.run.dir.name)
        bar.close()
        return self.evals[-1] if self.evals else self._do_eval(started, start_step)
