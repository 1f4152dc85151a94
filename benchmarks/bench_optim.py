"""One optimizer step over the BERT-base encoder weights (12 layers x [4 x 768x768 + 3072x768 +
768x3072] = 85M float32): MaskedAdamW (dense state, compact state at 90% sparsity) against
torch.optim.AdamW (fused, foreach), with a correctness check first.

    python benchmarks/bench_optim.py [--device cpu|cuda] [--repeats 3] [--rounds 3] [--sparsity 0.9] [--threads N]
"""
import argparse
import gc
import statistics

import torch

import harness
from sparsebert.ops import mask_nnz, pack_mask
from sparsebert.optim import MaskedAdamW


def encoder_shapes(layers: int = 12, hidden: int = 768, intermediate: int = 3072) -> list[tuple[int, int]]:
    return [(hidden, hidden)] * 4 * layers + [(intermediate, hidden), (hidden, intermediate)] * layers


def check_correctness(device: str) -> float:
    """A few steps of MaskedAdamW (no masks; and masked, vs AdamW on masked grads) against torch."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48,), (33, 17)]
    worst = 0.0
    for masked in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        keeps = [(torch.rand(s, generator=gen) < 0.3).to(device) if masked and len(s) == 2 else None for s in shapes]
        ref = [torch.nn.Parameter((p * k if k is not None else p).detach().clone()) for p, k in zip(params, keeps)]
        opt = MaskedAdamW([dict(params=params, masks=[pack_mask(k) if k is not None else None for k in keeps])],
                          lr=1e-2, weight_decay=0.1)
        ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
        for _ in range(5):
            for p, r, k in zip(params, ref, keeps):
                g = torch.randn(p.shape, generator=gen).to(device)
                p.grad = g
                r.grad = g * k if k is not None else g
            opt.step()
            ref_opt.step()
        worst = max(worst, max((p - r).abs().max().item() for p, r in zip(params, ref)))
    assert worst < 1e-5, f"MaskedAdamW disagrees with torch.optim.AdamW by {worst}"
    return worst


def torch_state_nbytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes over all cases; the median over rounds evens out a noisy, shared machine")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); default: torch's")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device

    max_err = check_correctness(device)
    print(f"correctness: max |MaskedAdamW - torch AdamW| over 5 steps = {max_err:.3g}")

    gen = torch.Generator().manual_seed(0)
    shapes = encoder_shapes()
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3).to(device)
    masks = [pack_mask((torch.rand(s, generator=gen) >= args.sparsity).to(device)) for s in shapes]
    numel = sum(p.numel() for p in params)
    kept = sum(mask_nnz(m) for m in masks)

    def time_step(opt) -> float:
        return harness.median_time(opt.step, device, repeats=args.repeats, warmup=2)

    cases = [
        ("torch AdamW fused", lambda: torch.optim.AdamW(params, lr=1e-4, fused=True), None),
        ("torch AdamW foreach", lambda: torch.optim.AdamW(params, lr=1e-4, foreach=True), None),
        ("ours dense state, no masks", lambda: MaskedAdamW(params, lr=1e-4), True),
        ("ours dense state, no masks, check_finite off", lambda: MaskedAdamW(params, lr=1e-4, check_finite=False), False),
        (f"ours dense state, masks {args.sparsity:.0%}",
         lambda: MaskedAdamW([dict(params=params, masks=masks)], lr=1e-4), True),
        (f"ours dense state, masks {args.sparsity:.0%}, check_finite off",
         lambda: MaskedAdamW([dict(params=params, masks=masks)], lr=1e-4, check_finite=False), False),
        (f"ours compact state, masks {args.sparsity:.0%}",
         lambda: MaskedAdamW([dict(params=params, masks=masks)], lr=1e-4, compact=True), True),
        (f"ours compact state, masks {args.sparsity:.0%}, check_finite off",
         lambda: MaskedAdamW([dict(params=params, masks=masks)], lr=1e-4, compact=True, check_finite=False), False),
    ]
    # Round-robin over the cases, so that load from other processes hits them alike.
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    state_bytes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, build, _ in cases:
            opt = build()
            times[name].append(time_step(opt))
            state_bytes[name] = opt.state_nbytes() if isinstance(opt, MaskedAdamW) else torch_state_nbytes(opt)
            del opt
            gc.collect()
    fused_name = cases[0][0]
    fused_time, fused_bytes = statistics.median(times[fused_name]), state_bytes[fused_name]
    rows = []
    for name, _, check_finite in cases:
        seconds = statistics.median(times[name])
        rows.append({
            "optimizer": name,
            "check_finite": "" if check_finite is None else str(check_finite),
            "step_ms": seconds * 1e3,
            "vs_fused": seconds / fused_time,
            "state_MB": state_bytes[name] / 2**20,
            "state_vs_fused": state_bytes[name] / fused_bytes,
            "rounds_ms": [round(t * 1e3, 1) for t in times[name]],
        })
    name = "optim" if args.threads is None else f"optim_{args.threads}thread"
    harness.report(name, rows, device, extra={
        "params": numel, "kept": kept, "sparsity": args.sparsity, "repeats": args.repeats, "rounds": args.rounds,
        "correctness_max_abs_err": max_err,
        "note": "one step() over BERT-base encoder weights; state_MB includes step counters and, for compact "
                "state, the copies of the masks the state was compacted for",
    })


if __name__ == "__main__":
    main()
