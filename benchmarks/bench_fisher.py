"""The oBERT criterion's gradient statistics: folding gradients into the block Fisher, `fold` at a time
with one batched matrix product (sparsebert.sparsity.fisher.BlockFisher), against the moving average
updated once per gradient (mul_ + addcmul_ over the blocks).

Correctness first (the Fisher inverse equals the per-gradient one's), then interleaved rounds over
MiniLM's encoder matrices (6 layers of Q, K, V, O, FFN in, FFN out at width 384): the time to take
in one gradient of every matrix, medians of per-round paired ratios.

    python benchmarks/bench_fisher.py [--layers 6] [--rounds 5] [--threads 1]
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

from sparsebert.sparsity.fisher import BlockFisher  # noqa: E402


class PerGradient(BlockFisher):
    """The baseline: each gradient updates the blocks at once, a pass over all of them."""

    def add(self, grad):
        g = self._split(grad)
        self.blocks.mul_(self.beta).addcmul_(g.unsqueeze(2), g.unsqueeze(1), value=1.0 - self.beta)
        self.count += 1
        self._inverse = None


def check(fold: int) -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(96, 130, generator=g) for _ in range(2 * fold + 3)]
    ours, base = BlockFisher(96, 130, fold=fold), PerGradient(96, 130, fold=fold)
    for grad in grads:
        ours.add(grad)
        base.add(grad)
    torch.testing.assert_close(ours.inverse(), base.inverse(), rtol=1e-3, atol=1e-3 * float(base.inverse().abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--fold", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check(args.fold)
    print(f"correct: the folded Fisher's inverse equals the per-gradient one's (fold {args.fold})")

    h = args.hidden
    shapes = args.layers * ([(h, h)] * 4 + [(4 * h, h), (h, 4 * h)])
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(args.fold)]
    kinds = {"per gradient (mul_ + addcmul_)": PerGradient, f"folded, {args.fold} at a time (ours)": BlockFisher}
    stats = {name: [cls(*s, block=args.block, fold=args.fold) for s in shapes] for name, cls in kinds.items()}
    times = {name: [] for name in kinds}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name in kinds:  # interleaved: both see the same state of the machine
            start = time.perf_counter()
            for step in grads:  # one fold's worth of gradients, so the batched product is counted
                for fisher, grad in zip(stats[name], step):
                    fisher.add(grad)
            times[name].append((time.perf_counter() - start) / len(grads))
        load.append(os.getloadavg()[0])
    base, ours = times.values()
    ratio = statistics.median(o / b for o, b in zip(ours, base))
    weights = sum(a * b for a, b in shapes)
    rows = [{"statistics": name, "ms per gradient": 1e3 * statistics.median(t),
             "vs per gradient": statistics.median(x / b for x, b in zip(t, base))} for name, t in times.items()]
    harness.report("bench_fisher", rows, "cpu", extra={
        "weights": weights, "blocks_gib": weights * args.block * 4 / 2**30, "held_gib": weights * args.fold * 4 / 2**30,
        "args": vars(args), "load_average": load, "ratio": ratio})


if __name__ == "__main__":
    main()
