"""The trainer's callbacks for a run directory: metrics, a time limit, periodic evaluation,
checkpoints with exact resume, the progress bar and the test kill hook. A stage runs them in the order of `for_run`:
evaluation comes before the checkpoint of the same step (the checkpoint holds it), and the
progress bar after the checkpoint, whose on_train_begin restores the step the bar starts from."""
from __future__ import annotations

import logging
import os
import time

from tqdm.auto import tqdm

from . import checkpointing
from .distributed import from_main
from .logs import bars_enabled
from .runs import Run, kill_hook
from .trainer import Callback, StepLog, Trainer

log = logging.getLogger(__name__)


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def due(step: int, every: int, total: int) -> bool:
    return step % every == 0 or step == total


class MetricsLog(Callback):
    """metrics.jsonl: the mean train loss every `every` steps (and at pruning events and the end), with
    the LR and the method's terms; every evaluation."""

    def __init__(self, run: Run, every: int):
        self.run, self.every = run, every
        self.running: list[float] = []  # train losses since the last line

    def on_step_end(self, trainer: Trainer, log: StepLog) -> None:
        self.running.append(log.loss)
        if due(log.step, self.every, trainer.total_steps) or log.events:
            self.run.log({"kind": "train", "step": log.step, "epoch": log.step / trainer.steps_per_epoch,
                          "loss": sum(self.running) / len(self.running), "lr": log.lr, **log.logs, **log.events})
            self.running = []

    def on_evaluate(self, trainer: Trainer, record: dict) -> None:
        self.run.log(record)

    def state_dict(self) -> dict:
        return {"running": self.running}

    def load_state_dict(self, state: dict) -> None:
        self.running = list(state.get("running", []))


class Evaluate(Callback):
    """Evaluate every `every` steps and at the end."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer: Trainer, log: StepLog) -> None:
        if due(log.step, self.every, trainer.total_steps):
            trainer.evaluate()


class Checkpoint(Callback):
    """Atomic checkpoints of model, optimizer, method, trainer and RNG state every `every` steps and at
    the end; with `resume`, on_train_begin restores the run's latest one (or starts over when it has
    none), so the run continues exactly as if uninterrupted."""

    def __init__(self, run: Run, every: int, keep: int, resume: bool = False):
        self.run, self.every, self.keep, self.resume = run, every, keep, resume

    def on_train_begin(self, trainer: Trainer) -> None:
        if not self.resume:
            return
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:  # killed before its first checkpoint: start over, forgetting what it logged
            self.run.truncate_metrics(0)
            return
        model, optimizer = checkpointing.for_restore(trainer.model, trainer.optimizer)
        state = Run.load_checkpoint(ckpt, model, optimizer, trainer.method, trainer.scaler)
        trainer.load_state_dict(state)
        checkpointing.restore_rank_rng(state.get("rank_rng"))
        saved_world = len(state.get("rank_rng") or []) or 1
        if saved_world != trainer.dist.world:
            log.info(f"[{trainer.label}] resuming a run of {saved_world} process(es) with {trainer.dist.world}: the same "
                       "global batches in the same order; dropout draws differ from the uninterrupted run")
        self.run.truncate_metrics(trainer.step)
        log.info(f"[{trainer.label}] resumed from {ckpt} at step {trainer.step}/{trainer.total_steps}")

    def on_step_end(self, trainer: Trainer, log: StepLog) -> None:
        if due(log.step, self.every, trainer.total_steps):
            self.save(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.stopped is not None:
            self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        model, optimizer, rank_rng = checkpointing.for_checkpoint(trainer.model, trainer.optimizer)
        self.run.save_checkpoint(trainer.step, model, optimizer, trainer.method, {**trainer.state_dict(), "rank_rng": rank_rng},
                                 keep=self.keep, scaler=trainer.scaler)


class TimeLimit(Callback):
    """End training once `seconds` have passed in this invocation (rank 0's clock decides for every
    rank); the stage then finishes with the steps it has, and its results and report say so (`stopped`)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = 0.0

    def on_train_begin(self, trainer: Trainer) -> None:
        self.started = time.time()

    def on_step_end(self, trainer: Trainer, log: StepLog) -> None:
        if log.step < trainer.total_steps and from_main(lambda: time.time() - self.started > self.seconds):
            trainer.stopped = f"time limit of {self.seconds:g} s reached"


class KillHook(Callback):
    """SPARSEBERT_KILL_AT=[<run dir name>@]step:N kills the process after step N (resume tests); with
    SPARSEBERT_KILL_RANK=R, only rank R of a distributed job."""

    def __init__(self, where: str):
        self.where = where

    def on_step_end(self, trainer: Trainer, log: StepLog) -> None:
        if os.environ.get("SPARSEBERT_KILL_RANK", str(trainer.dist.rank)) == str(trainer.dist.rank):
            kill_hook("step", log.step, self.where)


class ProgressBar(Callback):
    """A tqdm bar of the steps, and a line with the metrics and the ETA at every evaluation."""

    def __init__(self):
        self.bar = None
        self.started, self.start_step = 0.0, 0

    def on_train_begin(self, trainer: Trainer) -> None:
        self.started, self.start_step = time.time(), trainer.step
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=trainer.label, unit="step",
                        dynamic_ncols=True, mininterval=2.0, disable=not (bars_enabled() and trainer.dist.is_main))

    def on_step_end(self, trainer: Trainer, log: StepLog) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{log.loss:.4f}", lr=f"{log.lr:.2e}", refresh=False)

    def on_evaluate(self, trainer: Trainer, record: dict) -> None:
        done = trainer.step - self.start_step
        eta = (time.time() - self.started) / done * (trainer.total_steps - trainer.step) if done else 0.0
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
        log.info(f"[{trainer.label}] step {trainer.step}/{trainer.total_steps} eval: {shown} | ETA {fmt_seconds(eta)}")

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


def for_run(run: Run, training: dict, eval_every: int, resume: bool, time_limit: float | None) -> list[Callback]:
    """The callbacks of a stage run, in order."""
    limit = [TimeLimit(time_limit)] if time_limit else []
    return [MetricsLog(run, training["log_every"]), *limit, Evaluate(eval_every),
            Checkpoint(run, training["checkpoint_every"], training["keep_checkpoints"], resume),
            KillHook(run.dir.name), ProgressBar()]
