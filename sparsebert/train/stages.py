"""One stage run: teacher, upstream, downstream or evaluate.

Every stage: preflight checks (before any work), models and inputs, training through Trainer and
its callbacks, the export of the final model for plain transformers, done.json and report.md.
"""
from __future__ import annotations

import json
import logging
import math
import time

import torch

from ..data import glue
from ..data import text as T
from ..methods import MethodContext, NotRegistered, get_method
from ..sparsity import sparsity_report
from . import callbacks, distributed, runtime
from .checkpointing import plain_copy
from .errors import StageError
from .inputs import corpus_objective, make_inputs, on_corpus
from .models import check_model, export_model, frozen, load_model, load_tokenizer, quiet_transformers
from .report import write_stage_report
from .runs import Run, atomic_write_text
from .trainer import Trainer, schedule

log = logging.getLogger(__name__)


def build_method(cfg: dict):
    """The stage's method from its config, or StageError saying why it cannot be built."""
    kwargs = {k: v for k, v in cfg["method"].items() if k != "name"}
    try:
        return get_method(cfg["method"]["name"], **kwargs)
    except NotRegistered as e:
        raise StageError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise StageError(f"method {cfg['method']['name']!r} does not take these settings: {e}") from None


def given_models(cfg: dict, linked: bool = False) -> set[str]:
    """The optional models run_stage hands the method (see MethodContext), so that preflight and
    run_stage agree; `linked`: a pipeline stage, whose teacher link_plan will set."""
    if cfg["stage"] == "upstream":
        return {"teacher"}  # the dense model it starts from
    roles = cfg.get("roles", {})
    given = set()
    if (cfg["model"]["teacher"] or linked) and roles.get("teacher") != "none":
        given.add("teacher")
    if cfg["model"]["pretrained"] or roles.get("pretrained"):
        given.add("pretrained")
    return given


def preflight(cfg: dict, *, model_exists: bool = True) -> None:
    """Every check that needs no training: raise StageError with a clear message."""
    stage = cfg["stage"]
    runtime.resolve_device(cfg["run"])
    try:
        if on_corpus(cfg):
            T.check_corpus(cfg["data"]["corpus"])
            if cfg["data"]["eval_corpus"] is not None:
                T.check_corpus(cfg["data"]["eval_corpus"])
        else:
            glue.check_data(glue.get_task(cfg["data"]["task"]), cfg["data"]["data_dir"])
    except (ValueError, OSError, RuntimeError) as e:
        raise StageError(str(e)) from None
    if on_corpus(cfg) and cfg["data"]["augment"]:
        raise StageError("--augment makes variants of task examples; a corpus stage takes none")
    if stage not in ("teacher", "evaluate"):
        method = build_method(cfg)
        missing = sorted(method.needs() - given_models(cfg, linked=not model_exists))
        if missing:
            raise StageError(f"method {cfg['method']['name']!r} trains against the {' and '.join(missing)} model: "
                             + " and ".join(f"pass --{role} DIR" for role in missing) + " (or run `pipeline`)")
    distributed.preflight(cfg, model_exists)
    if not model_exists:  # a pipeline's downstream: its models are written by the earlier stages
        return
    check_model(cfg["model"]["name"])
    if stage == "upstream" and cfg["method"]["name"] == "dense" and corpus_objective(cfg) == "representation":
        raise StageError(f"upstream with method 'dense' needs a model with an MLM head; {cfg['model']['name']!r} "
                         "has none (its objective would be representation distillation, which needs a pruning method)")
    if stage == "evaluate" and on_corpus(cfg) and not cfg["model"]["teacher"] and corpus_objective(cfg) == "representation":
        raise StageError("evaluating a model without MLM head on a corpus compares it with a dense "
                         "model: pass --teacher <dense model>")
    if stage == "downstream" and cfg["model"]["teacher"]:
        check_model(cfg["model"]["teacher"], "teacher")
    if stage == "downstream" and cfg["model"]["pretrained"]:
        check_model(cfg["model"]["pretrained"], "pretrained model")


def _models(cfg: dict, inputs, device: torch.device):
    """(student, teacher, pretrained): the teacher of upstream is the dense model itself; evaluating a
    representation compares with --teacher; downstream's teacher and CAP's pre-trained encoder as given."""
    stage, m = cfg["stage"], cfg["model"]
    task = getattr(inputs, "task", None)
    student = load_model(m["name"], inputs.objective, inputs.num_labels, task).to(device)
    teacher_name = {"upstream": m["name"], "downstream": m["teacher"]}.get(stage)
    if stage == "evaluate" and inputs.objective == "representation":
        teacher_name = m["teacher"]
    teacher = frozen(load_model(teacher_name, inputs.objective, inputs.num_labels, task).to(device)) if teacher_name else None
    if teacher is not None and inputs.num_labels and teacher.config.num_labels != inputs.num_labels:
        raise StageError(f"teacher {teacher_name} has {teacher.config.num_labels} labels, "
                         f"task {task.name} has {inputs.num_labels}")
    pretrained = None
    if stage == "downstream" and "pretrained" in given_models(cfg):
        pretrained = frozen(load_model(m["pretrained"] or m["name"], "representation").to(device))
    return student, teacher, pretrained


def _reference(run: Run, inputs, teacher) -> dict | None:
    """The dense reference's metrics, measured once per run (kept across resume)."""
    path = run.dir / "reference.json"
    saved = distributed.from_main(lambda: json.loads(path.read_text()) if path.is_file() else None)
    if saved is not None:
        return saved
    if teacher is None:
        return None
    with torch.no_grad():
        reference = inputs.reference(teacher)
    reference["sparsity"] = sparsity_report(teacher)["overall"]
    reference["model"] = inputs.reference_name
    if distributed.current().is_main:
        atomic_write_text(path, json.dumps(reference))
    return reference


def eval_every(training: dict, total_steps: int, budget_size: int) -> int:
    """training.eval_every, else once per epoch (of the examples before augmentation), at most 10 times."""
    epoch = math.ceil(budget_size / training["batch_size"])
    return training["eval_every"] or max(epoch, math.ceil(total_steps / 10))


def run_stage(cfg: dict, run: Run, resumed: bool = False) -> dict:
    """Train (or evaluate) one stage into `run`; returns its results (also in done.json)."""
    if distributed.from_main(lambda: run.done):
        return distributed.from_main(run.results)
    quiet_transformers()
    device = runtime.apply(cfg["run"])
    stage, t = cfg["stage"], cfg["training"]
    started = time.time()
    runtime.seed_everything(t["seed"])
    tokenizer = load_tokenizer(cfg["model"]["name"])
    inputs = make_inputs(cfg, tokenizer, device)
    student, teacher, pretrained = _models(cfg, inputs, device)

    def evaluate(model=student) -> dict:
        return {**inputs.evaluate(model, teacher), "sparsity": sparsity_report(model)["overall"]}

    if stage == "evaluate":
        res = evaluate()
        results = {"stage": stage, "objective": inputs.objective, "final": res, "reference": None, "steps": 0,
                   "train_size": 0, "time_s": time.time() - started, "model_dir": cfg["model"]["name"],
                   "sparsity": sparsity_report(student)}

        def finish() -> dict:
            run.log({"kind": "eval", "step": 0, **res})
            run.finish(results)
            write_stage_report(run, cfg, results)
            return results
        results = distributed.from_main(finish)
        log.info("[evaluate] %s", json.dumps({k: round(v, 4) for k, v in res.items()}))
        return results

    reference = _reference(run, inputs, teacher)
    steps_per_epoch, total_steps = schedule(len(inputs.train), t, inputs.budget_size)
    method = build_method(cfg)
    ctx = MethodContext(student=student, teacher=teacher if "teacher" in given_models(cfg) else None,
                        pretrained=pretrained, objective=inputs.objective, num_labels=inputs.num_labels,
                        total_steps=total_steps, steps_per_epoch=steps_per_epoch, train_size=len(inputs.train),
                        device=device)
    try:
        method.setup(ctx)
    except ValueError as e:
        raise StageError(f"method {cfg['method']['name']!r} cannot run stage {stage}: {e}") from None
    student.to(device)
    distributed.check_tail(len(inputs.train), t["batch_size"], total_steps, steps_per_epoch)
    ctx.student = distributed.wrap(student, device, unused_parameters=inputs.objective == "representation")
    label = stage if stage == "upstream" else f"{stage}-{cfg['data']['task']}"
    trainer = Trainer(method=method, model=ctx.student, train_features=inputs.train, make_batch=inputs.batch, training=t,
                      total_steps=total_steps, steps_per_epoch=steps_per_epoch, device=device,
                      precision=cfg["run"]["precision"], evaluate=evaluate, label=label, started=started,
                      callbacks=callbacks.for_run(run, t, eval_every(t, total_steps, inputs.budget_size), resumed,
                                                  cfg["run"]["time_limit"]))
    log.info(f"[{label}] {cfg['method']['name']} | objective {inputs.objective} | {len(inputs.train)} examples | "
             f"{total_steps} steps ({steps_per_epoch}/epoch) | device {device} {cfg['run']['precision']}"
             + (f" | {trainer.dist.describe(t['batch_size'])}" if trainer.dist.active else ""))
    final = trainer.fit()
    plain = plain_copy(student)  # rank 0's; under FSDP2 every rank gathers its shards
    final = {k: v for k, v in final.items() if k not in ("kind", "step")}

    def finish() -> dict:
        model_dir = export_model(plain, tokenizer, run.dir / "model")
        from transformers import AutoModel
        results = {"stage": stage, "objective": inputs.objective, "final": final, "reference": reference,
                   "steps": trainer.step, "planned_steps": total_steps, "stopped": trainer.stopped,
                   "train_size": len(inputs.train), "time_s": trainer.elapsed(), "model_dir": str(model_dir),
                   "sparsity": sparsity_report(AutoModel.from_pretrained(model_dir)),
                   "method_state_keys": sorted(method.state_dict())}
        run.finish(results)
        run.prune_checkpoints(t["keep_checkpoints"])
        write_stage_report(run, cfg, results)
        return results
    results = distributed.from_main(finish)
    log.info(f"[{label}] done in {results['time_s']:.0f} s; report: {run.dir / 'report.md'}")
    return results
