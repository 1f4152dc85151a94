"""Planning and running: the stages of a pipeline and how each feeds the next, and the run command
behind every CLI stage (plan, preflight, run dir, run)."""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from . import config as C
from . import distributed
from .errors import ConfigError
from .report import write_pipeline_report
from .runs import Run
from .stages import preflight, run_stage

log = logging.getLogger(__name__)


def student_role(cfg: dict) -> str:
    return cfg.get("roles", {}).get("student") or "upstream"


def pipeline_plan(user: dict) -> list[tuple[str, dict]]:
    """(sub-run name, resolved config): teacher per task, upstream (when a downstream student starts from
    it, as the method's recipe says), downstream per task. Model paths are linked by link_plan."""
    base = C.resolve("downstream", user)
    tasks = base["data"]["tasks"] or [base["data"]["task"]]
    if isinstance(tasks, str):
        tasks = [x for x in tasks.split(",") if x]
    teachers, downs = [], []
    for task in tasks:
        u = C.merge(user, {"data": {"task": task, "tasks": None}})
        teachers.append((f"teacher-{task}", C.resolve("teacher", u)))
        downs.append((f"downstream-{task}", C.resolve("downstream", u)))
    ups = []
    if any(student_role(cfg) == "upstream" for _, cfg in downs):
        ups.append(("upstream", C.resolve("upstream", C.merge(user, {"data": {"tasks": None}}))))
    return teachers + ups + downs


def resolve_pipeline(user: dict) -> dict:
    """The pipeline's config: {stage: pipeline, user: overrides, run, stages: {name: resolved config}}."""
    base = C.resolve("downstream", user)
    return {"stage": "pipeline", "user": user, "run": base["run"], "stages": dict(pipeline_plan(user))}


def link_plan(plan: list[tuple[str, dict]], root: Path) -> list[tuple[str, dict]]:
    """Point each downstream at its inputs in the pipeline dir: the upstream output (or the pre-trained
    model) as student, its task's fine-tuned teacher, and the pre-trained model when the method uses it."""
    out = []
    original = plan[0][1]["model"]["name"]
    for name, cfg in plan:
        cfg = copy.deepcopy(cfg)
        cfg["run"]["dir"] = str(root / name)
        if cfg["stage"] == "downstream":
            if student_role(cfg) == "upstream":
                cfg["model"]["name"] = str(root / "upstream" / "model")
            cfg["model"]["teacher"] = str(root / f"teacher-{cfg['data']['task']}" / "model")
            if cfg["roles"].get("pretrained") and not cfg["model"]["pretrained"]:
                cfg["model"]["pretrained"] = original
        out.append((name, cfg))
    return out


def run_pipeline(pcfg: dict, run: Run) -> dict:
    """Run (or continue) every stage of a pipeline into its sub-dir; the summary report after each."""
    stages = []
    for name, cfg in pcfg["stages"].items():
        sub_dir = run.dir / name
        if distributed.from_main(lambda: (sub_dir / "config.json").is_file()):
            sub, resumed = distributed.run_class().open(sub_dir), True
            sub.check_same_config(cfg)
        else:
            sub, resumed = distributed.create_run(cfg, sub_dir), False
        if distributed.from_main(lambda: sub.done):
            log.info(f"[pipeline] {name}: done earlier, reusing {sub_dir}")
        results = run_stage(cfg, sub, resumed=resumed)
        stages.append({"name": name, "stage": cfg["stage"], "task": cfg["data"]["task"] if cfg["stage"] != "upstream"
                       else "corpus", "method": cfg["method"]["name"], "results": results})
        if distributed.current().is_main:
            write_pipeline_report(run.dir, stages)
    summary = {"stage": "pipeline", "stages": {s["name"]: s["results"] for s in stages}}
    run.finish(summary)
    if distributed.current().is_main:
        write_pipeline_report(run.dir, stages)
    return summary


def print_plan(cfg: dict) -> None:
    stages = cfg["stages"] if cfg["stage"] == "pipeline" else {cfg["stage"]: cfg}
    d = distributed.current()
    lines = ["plan:" + (f" {d.mode} over {d.world} processes ({d.backend}); batch = global batch = per-rank batch x "
                        f"{d.world}" if d.active else "")]
    for name, s in stages.items():
        t = s["training"]
        steps = f"{t['max_steps']} steps" if t["max_steps"] else f"{t['epochs']} epoch(s)"
        what = s["data"]["task"] if s["stage"] != "upstream" else f"corpus {s['data']['corpus']}"
        per_rank = f" ({t['batch_size'] // d.world} per rank)" if d.active else ""
        lines.append(f"  {name:<22} {s['method']['name']:<14} {what:<28} {steps}, batch {t['batch_size']}{per_rank}, lr {t['lr']}")
    log.info("\n".join(lines))


def _resolve(stage: str, user: dict) -> dict:
    return resolve_pipeline(user) if stage == "pipeline" else C.resolve(stage, user)


def run_command(stage: str, user: dict, resume: str | None = None, print_config: bool = False,
                plan_note: str | None = None) -> int:
    """A stage (or the pipeline) from the user's overrides, or the continuation of a run: everything
    is checked before the run dir is made."""
    if resume:
        run = Run.open(resume)
        saved = run.saved_config()
        if saved["stage"] != stage:
            raise ConfigError(f"{resume} is a {saved['stage']} run, not {stage}")
        saved, user = distributed.launch_settings(saved, user)
        if user:  # what the command line says must agree with the run being resumed
            now = _resolve(stage, user)
            if stage == "pipeline":
                now["stages"] = dict(link_plan(list(now["stages"].items()), Path(saved["run"]["dir"])))
            run.check_same_config(now)
        cfg = saved
    else:
        cfg = _resolve(stage, user)
    if print_config:
        print(C.dump(cfg))
        return 0
    if stage == "pipeline":
        for c in cfg["stages"].values():  # later stages read models that earlier ones will write
            preflight(c, model_exists=c["stage"] != "downstream")
    else:
        preflight(cfg)
    distributed.start(cfg["run"])
    try:
        return _run(stage, cfg, resume, plan_note)
    finally:
        distributed.stop()


def _run(stage: str, cfg: dict, resume: str | None, plan_note: str | None) -> int:
    if resume:  # a corrupted checkpoint is refused now, not after the models are built
        subs = [Path(resume) / name for name in cfg["stages"]] if stage == "pipeline" else [Path(resume)]
        for sub in subs:
            if (sub / "config.json").is_file() and not Run(sub).done:
                ckpt = Run(sub).latest_checkpoint()
                if ckpt is not None:
                    distributed.from_main(lambda: Run.verify(ckpt))
    if plan_note:
        log.info(plan_note)
    print_plan(cfg)
    started = time.time()
    if resume:
        run = distributed.run_class().open(resume)
    else:
        path = distributed.from_main(lambda: Run.new_path(cfg))
        cfg["run"]["dir"] = str(path)
        if stage == "pipeline":
            cfg["stages"] = dict(link_plan(list(cfg["stages"].items()), path))
        run = distributed.create_run(cfg, path)
    log.info(f"run dir: {run.dir}")
    if stage == "pipeline":
        run_pipeline(cfg, run)
    else:
        run_stage(cfg, run, resumed=bool(resume))
    log.info(f"finished in {time.time() - started:.0f} s; report: {run.dir / 'report.md'}")
    return 0
