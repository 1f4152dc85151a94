"""Every method on SST-2 with the real MiniLM on CPU, through the trainer users run, with the shipped
recipes and nothing overridden: dev accuracy and wall time. Each run is a `python -m sparsebert.train`
stage (the command is recorded with its row) in its own run dir under --runs-dir, so an interrupted
benchmark continues where it stopped and a finished run is reused.

    python benchmarks/bench_methods.py                       # SST-2 subset of 2,000 examples, every method
    python benchmarks/bench_methods.py --augment 20          # with 20 augmented copies of every example
    python benchmarks/bench_methods.py --max-train 4000      # a subset of 4,000
    python benchmarks/bench_methods.py --max-train 67349     # all of SST-2 train
    python benchmarks/bench_methods.py --methods cap --runs 0.9:1   # one method, sparsity and seed
    python benchmarks/bench_methods.py --methods "cap[criterion=movement]"   # a recipe variant (exploration)
    python benchmarks/bench_methods.py --upstream 0.9=runs/upstream-90/model,0.8=runs/upstream-80/model

The dense teacher first (the `teacher` stage, seed 0; the teacher of KAP, CAP and Prune OFA), then every
method at 90% and 80% sparsity with three seeds as `downstream` stages. Prune OFA fine-tunes a sparse
pre-trained model with its pattern locked: --upstream names one per sparsity (the output of
`python -m sparsebert.train upstream --method prune-ofa ...`). The training set is a random subset of
SST-2 train fixed by seed 0 (`data.subset_seed`); the dev set is the full one.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import RESULTS, report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from sparsebert.methods import get_method, load_recipe  # noqa: E402
from sparsebert.train.config import merge, parse_value, resolve, set_path  # noqa: E402
from sparsebert.train.pipeline import run_command  # noqa: E402
from sparsebert.train.runs import Run  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared/data beside the project; a git worktree one level deeper finds it one level up.
DATA = next((d for d in (pathlib.Path(os.environ.get("SPARSEBERT_DATA", ROOT.parent / "shared" / "data")),
                         ROOT.parents[1] / "shared" / "data") if d.is_dir()), ROOT.parent / "shared" / "data")
METHODS = ["dense", "oneshot-magnitude", "gradual-magnitude", "small-dense", "sparsebert-kap", "cap", "prune-ofa"]


def command(stage: str, user: dict) -> str:
    """The `python -m sparsebert.train` command line of a run (--set for every override)."""
    sets = []

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is not None:
                sets.append(f"{prefix}{k}={json.dumps(v) if not isinstance(v, str) else v}")
    walk(user)
    return f"python -m sparsebert.train {stage} --set " + " ".join(sets)


def run_stage_dir(stage: str, user: dict, run_dir: pathlib.Path) -> dict:
    """Run one stage through the CLI's run command into run_dir (continued if it was interrupted,
    reused if it finished, in both cases only if it was made with this config) and return its results."""
    done = run_dir / "done.json"
    if done.is_file():
        Run(run_dir).check_same_config(resolve(stage, user))
    else:
        resume = str(run_dir) if (run_dir / "config.json").is_file() else None
        run_command(stage, merge(user, {"run": {"dir": str(run_dir)}}), resume=resume)
    return json.loads(done.read_text())


def summary(rows: list[dict]) -> str:
    """Markdown: dev accuracy per method and sparsity, mean over seeds, and its share of the dense one."""
    dense = next((r["dev_acc"] for r in rows if r["method"] == "dense"), None)
    lines = ["| method | sparsity | seeds | dev accuracy (each seed) | mean | % of dense | wall time per run |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    for (method, target), runs in groups.items():
        mean = statistics.mean(r["dev_acc"] for r in runs)
        share = f"{100 * mean / dense:.1f}%" if dense else ""
        minutes = statistics.mean(r["wall_s"] for r in runs) / 60
        threads = "/".join(sorted({str(r.get("threads", "")) for r in runs}))
        each = ", ".join(f"{r['dev_acc']:.3f}" for r in runs)
        percent = f"{target:.0%}" if abs(target * 100 - round(target * 100)) < 1e-9 else f"{target:.1%}"
        lines.append(f"| {method} | {percent} | {len(runs)} | {each} | "
                     f"{mean:.3f} | {share} | {minutes:.1f} min ({threads} thread{'' if threads == '1' else 's'}) |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Dev accuracy of every run, one line per method spec: a dot per seed, a bar at the mean,
    coloured by sparsity, against the dense model and 95% of it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"}, reverse=True)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(specs) + 2.6))
    for i, target in enumerate(targets):
        offset = (i - (len(targets) - 1) / 2) * 0.25
        color = f"C{i}"
        for y, spec in enumerate(specs):
            accs = [r["dev_acc"] for r in rows if (r["method"], r["target"]) == (spec, target)]
            if accs:
                ax.scatter(accs, [y + offset] * len(accs), s=14, color=color, alpha=0.6)
                ax.plot([statistics.mean(accs)] * 2, [y + offset - 0.1, y + offset + 0.1], color=color, lw=2.5)
        ax.scatter([], [], color=color, label=f"{target:.0%} sparsity (dots: seeds, bar: mean)")
    dense = next((r["dev_acc"] for r in rows if r["method"] == "dense"), None)
    if dense:
        ax.axvline(dense, color="k", lw=1, label=f"dense {dense:.3f}")
        ax.axvline(0.95 * dense, color="k", lw=1, ls="--", label="95% of dense")
    ax.set_yticks(range(len(specs)), specs, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SST-2 dev accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_method(spec: str) -> tuple[str, dict]:
    """'cap', or 'cap[criterion=magnitude,distill.task=0.2]': a method and overrides of its recipe's
    method options (values in YAML, dotted keys into nested options). The whole spec names the rows."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.+)\])?", spec)
    if not match or match.group(1) not in METHODS:
        raise ValueError(f"unknown method {spec!r}; from: {', '.join(METHODS)}, optionally with [option=value,...]")
    pairs = [kv.split("=", 1) for kv in match.group(2).split(",")] if match.group(2) else []
    if any(len(kv) != 2 for kv in pairs):
        raise ValueError(f"{spec!r}: overrides are option=value pairs")
    overrides: dict = {}
    for key, value in pairs:
        set_path(overrides, key.strip(), parse_value(value))
    return match.group(1), overrides


def check_spec(name: str, overrides: dict) -> None:
    """Build the method as its runs will, so that an unknown option fails before any training."""
    if name == "dense":
        return
    stage = "downstream"
    recipe = load_recipe(name, stage)
    get_method(name, **merge({k: v for k, v in recipe["method"].items() if k != "name"}, {**overrides, "sparsity": 0.9}))


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated, from: " + ",".join(METHODS) +
                    "; a method may override its recipe's options: cap[criterion=magnitude]")
    ap.add_argument("--max-train", type=int, default=2000, help="training examples: a subset fixed by seed 0")
    ap.add_argument("--max-dev", type=int, default=None)
    ap.add_argument("--augment", type=int, default=0,
                    help="TinyBERT-style augmented copies of every training example for the pruning methods "
                    "(the CLI's --augment; SparseBERT augments small tasks)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of every method at 90%% and 80%%")
    ap.add_argument("--runs", default=None, help="instead: sparsity:seed pairs, e.g. 0.9:1,0.8:0")
    ap.add_argument("--upstream", default="", help="Prune OFA's sparse pre-trained models: sparsity=dir pairs, "
                    "e.g. 0.9=runs/upstream-90/model")
    ap.add_argument("--student", choices=("pretrained", "finetuned"), default="pretrained",
                    help="what the pruned student starts from: the pre-trained encoder with a new head (the papers' "
                    "KAP and CAP), or the fine-tuned dense teacher (pruning a task model)")
    ap.add_argument("--teacher", type=pathlib.Path, default=None,
                    help="a finished teacher run dir to use (made with the config this benchmark would give it); "
                    "default: <runs-dir>/teacher, trained if missing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None, help="results file name; default bench_methods_<max-train>[_aug<N>], so that "
                    "task sizes and augmentations never share a table")
    ap.add_argument("--runs-dir", type=pathlib.Path, default=None,
                    help="where the stage runs live (the teacher is shared by every method of a budget); "
                    "default runs/bench_methods/<budget>")
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of adding to it")
    args = ap.parse_args(argv)
    augmented = f"_aug{args.augment}" if args.augment else ""
    args.name = args.name or f"bench_methods_{args.max_train}{augmented}"
    runs_dir = args.runs_dir or ROOT / "runs" / "bench_methods" / str(args.max_train)
    try:
        methods = [(spec, *parse_method(spec)) for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.methods)]
        for _, name, overrides in methods:  # an unknown option fails now, not after the teacher has trained
            check_spec(name, overrides)
        upstream = {float(sp): pathlib.Path(d) for sp, d in (pair.split("=", 1) for pair in args.upstream.split(",") if pair)}
    except ValueError as error:
        ap.error(str(error))
    runs = [(sp, s) for sp in (0.9, 0.8) for s in range(args.seeds)]
    if args.runs:
        runs = [(float(sp), int(seed)) for sp, seed in (pair.split(":") for pair in args.runs.split(","))]
    missing = sorted({sp for sp, _ in runs if sp not in upstream or not (upstream[sp] / "config.json").is_file()})
    if any(name == "prune-ofa" for _, name, _ in methods) and missing:
        ap.error(f"prune-ofa needs a sparse pre-trained model for sparsity {missing}: --upstream {missing[0]}=DIR")

    common = {"model": {"name": "minilm"},
              "data": {"task": "sst2", "data_dir": str(DATA / "glue"), "max_train_examples": args.max_train,
                       "subset_seed": 0, "max_eval_examples": args.max_dev},
              "training": {"keep_checkpoints": 0}, "run": {"threads": args.threads}}
    results = RESULTS / f"{args.name}_cpu.json"
    if args.fresh:
        results.unlink(missing_ok=True)

    def record(spec, sparsity, seed, res, wall_s, cmd, run_dir):
        # Read back just before writing: another invocation (one per core) may have added rows.
        rows = [r for r in (json.loads(results.read_text())["rows"] if results.exists() else [])
                if (r["method"], r["target"], r["seed"]) != (spec, sparsity, seed)]
        row = {"method": spec, "target": sparsity, "seed": seed, "dev_acc": res["final"]["dev/accuracy"],
               "sparsity": res["sparsity"]["overall"], "layers": len(res["sparsity"]["layers"]), "wall_s": wall_s,
               "threads": Run(run_dir).saved_config()["run"]["threads"] or os.cpu_count(), "student": args.student, "steps": res["steps"],
               "command": cmd}
        rows = sorted(rows + [row], key=lambda r: (METHODS.index(parse_method(r["method"])[0]), r["method"],
                                                   -r["target"], r["seed"]))
        print(row, flush=True)
        report(args.name, rows, "cpu", extra={"args": {k: str(v) for k, v in vars(args).items()}})
        (RESULTS / f"{args.name}_cpu.md").write_text(summary(rows))
        plot(rows, RESULTS / f"{args.name}_cpu.png")

    teacher_user = merge(common, {"training": {"seed": 0}})
    teacher_dir = args.teacher or runs_dir / "teacher"
    teacher = run_stage_dir("teacher", teacher_user, teacher_dir)
    if any(name == "dense" for _, name, _ in methods):
        record("dense", 0.0, 0, teacher, teacher["time_s"], command("teacher", teacher_user), teacher_dir)

    for spec, name, overrides in methods:
        if name == "dense":
            continue
        for sparsity, seed in runs:
            run_dir = runs_dir / f"{slug(spec)}-{sparsity}-{seed}{augmented.replace('_', '-')}"
            user = merge(common, {"model": {"teacher": teacher["model_dir"]}, "data": {"augment": args.augment},
                                  "method": {"name": name, **overrides, "sparsity": sparsity},
                                  "training": {"seed": seed}})
            if args.student == "finetuned":
                user = merge(user, {"model": {"name": teacher["model_dir"]}, "roles": {"student": "pretrained"}})
            if name == "prune-ofa":
                user = merge(user, {"model": {"name": str(upstream[sparsity])}})
            res = run_stage_dir("downstream", user, run_dir)
            record(spec, sparsity, seed, res, res["time_s"], command("downstream", user), run_dir)


if __name__ == "__main__":
    main()
