"""Why CAP with zero-initialised movement scores collapses on a short run: how good are the masks
that its scores would choose, early in training?

    python benchmarks/probe_movement_masks.py [--steps 12,25,50,100,175,250] [--score-init zeros]

CAP's student trains on SST-2 (8,000 examples, batch 32, lr 4e-4, scores at their own LR) with its
pruning held off, and at each listed step the scores S choose per-matrix masks at 25% and 50%
sparsity. Each mask is applied to the fine-tuned dense teacher of bench_methods (no retraining), and
the dev accuracy says how much of the model the mask leaves. Random masks, magnitude masks and
masks from -S are the references. Writes benchmarks/results/probe_movement_masks_cpu.json.
"""
from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402
from harness import report  # noqa: E402

from sparsebert.data.order import epoch_order  # noqa: E402
from sparsebert.methods import MethodContext, get_method  # noqa: E402


def masked_accuracy(teacher, scores, key, sparsity, dev) -> float:
    """Dev accuracy of the teacher with, in each scored matrix, the `sparsity` share of lowest key(S, W) zeroed."""
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, s in scores.items():
            weight = model.get_parameter(name + ".weight")
            order = key(s, weight).flatten().argsort(stable=True)
            weight.view(-1)[order[: math.floor(sparsity * weight.numel())]] = 0
    return bm.accuracy(model, dev)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="12,25,50,100,175,250")
    ap.add_argument("--score-init", default="zeros", choices=["zeros", "magnitude"])
    ap.add_argument("--score-lr", type=float, default=1e-2)
    ap.add_argument("--max-train", type=int, default=8000)
    ap.add_argument("--max-dev", type=int, default=400)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = sorted(int(s) for s in args.steps.split(","))
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    teacher_dir = bm.ROOT / "runs" / "bench_methods_teacher"
    if not (teacher_dir / "config.json").exists():
        sys.exit(f"no teacher in {teacher_dir}: run benchmarks/bench_methods.py --methods dense first")
    path = bm.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = bm.encode(tokenizer, *bm.read_sst2("train", args.max_train, 0), 64)
    dev = bm.encode(tokenizer, *bm.read_sst2("dev", args.max_dev, 0), 64)
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir).eval().requires_grad_(False)
    torch.manual_seed(0)  # the new classifier head's init: without it, a run was not a function of its seed
    student = BertForSequenceClassification.from_pretrained(path, num_labels=2)

    # Pruning held off (warm-up over the whole run): the scores train, the masks stay full.
    method = get_method("cap", contrastive=None, warmup_frac=0.99, score_lr=args.score_lr, score_init=args.score_init)
    n, batch_size = train["input_ids"].shape[0], 32
    steps_per_epoch = math.ceil(n / batch_size)
    ctx = MethodContext(student=student, teacher=teacher, pretrained=None, objective="classification", num_labels=2,
                        total_steps=3 * steps_per_epoch, steps_per_epoch=steps_per_epoch, train_size=n,
                        device=torch.device("cpu"))
    torch.manual_seed(0)
    method.setup(ctx)
    student.train()
    opt = method.optimizer(args.lr, 0.01)
    names, modules = method.pruner.names, method.pruner.modules
    generator = torch.Generator().manual_seed(0)
    keys = {
        "S": lambda s, w: s,
        "-S": lambda s, w: -s,
        "random": lambda s, w: torch.rand(w.shape, generator=generator),
        "|W|": lambda s, w: w.abs(),
    }
    rows, step, epoch = [], 0, 0
    while step < steps[-1]:
        for batch in bm.batches(train, batch_size, epoch_order(n, 0, epoch, train["attention_mask"].sum(1), batch_size)):
            loss = bm.train_step(method, opt, batch, step, args.lr)
            step += 1
            if step in steps:
                scores = {name: m.scores.detach().clone() for name, m in zip(names, modules)}
                row = {"step": step, "loss": loss.item(), "max_abs_S": max(float(s.abs().max()) for s in scores.values())}
                for label, key in keys.items():
                    for sparsity in (0.25, 0.5):
                        row[f"{label}@{sparsity:.0%}"] = masked_accuracy(teacher, scores, key, sparsity, dev)
                print(row, flush=True)
                rows.append(row)
            if step >= steps[-1]:
                break
        epoch += 1
    report("probe_movement_masks", rows, "cpu",
           extra={"args": vars(args), "dense_teacher_dev_acc": bm.accuracy(teacher, dev)})


if __name__ == "__main__":
    main()
