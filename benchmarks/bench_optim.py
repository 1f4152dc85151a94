"""One optimizer step over the BERT-base encoder weights (12 layers x [4 x 768x768 + 3072x768 +
768x3072] = 85M float32), laid out as the model's 72 tensors and as one flat tensor: MaskedAdamW
(dense state, compact state at 90% sparsity) against torch.optim.AdamW (fused, foreach), with a
correctness check first.

    python benchmarks/bench_optim.py [--device cpu|cuda] [--repeats 3] [--rounds 9] [--sparsity 0.9] [--threads N] [--floor]

torch's fused AdamW costs very different amounts over 72 tensors and over one (a parallel region
per tensor), so every row has its ratio to both: vs_fused_72 and vs_fused_flat, each the median
over rounds of the ratio to that baseline measured in the same round.

--floor (CPU with AVX-512) adds, on the flat tensor, kernels that move a step's bytes with next to no
arithmetic (optim_floor.cpp, compiled at start): fused AdamW's, a compact-state step's (with and
without its state, reading every line or only those with a kept weight) and the weight and gradient
lines alone; what this machine's memory system allows a kernel that moves those bytes.
"""
import argparse
import gc
import pathlib
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


class Floor:
    """One of optim_floor.cpp's traffic kernels over the flat tensor, timed like an optimizer's step."""

    def __init__(self, kernel, *args, state_nbytes: int = 0):
        self.kernel, self.args, self.nbytes = kernel, args, state_nbytes

    def step(self) -> None:
        self.kernel(*self.args)

    def state_nbytes(self) -> int:
        return self.nbytes


def floor_cases(param: torch.nn.Parameter, mask: torch.Tensor):
    """(name, build) of the traffic kernels over one flat tensor and its packed mask."""
    from torch.utils.cpp_extension import load
    ext = load("sparsebert_optim_floor", [str(pathlib.Path(__file__).with_name("optim_floor.cpp"))],
               extra_cflags=["-O3", "-mavx512f", "-fopenmp"], extra_ldflags=["-fopenmp"])
    w, g = param.data, param.grad
    if w.numel() % 16384:
        raise ValueError(f"--floor needs a multiple of 16384 weights, got {w.numel()}")
    dense = [torch.zeros_like(w), torch.zeros_like(w)]
    kept = mask_nnz(mask)
    compact = [torch.zeros(kept + 16), torch.zeros(kept + 16)]  # 16 of slack: whole-vector stores
    starts = ext.compact_starts(mask)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    yield "floor: fused AdamW's bytes", lambda: Floor(ext.fused_traffic, w, g, *dense, state_nbytes=nbytes(dense))
    for state, only_kept, name in ((True, False, "compact step's bytes"),
                                   (True, True, "compact step's bytes, only lines with a kept weight"),
                                   (False, False, "weight and gradient lines read, kept weights written")):
        yield f"floor: {name}", lambda state=state, only_kept=only_kept: Floor(
            ext.compact_traffic, w, g, mask, starts, *compact, state, only_kept, state_nbytes=nbytes(compact) if state else 0)
    yield "floor: weight and gradient lines read", lambda: Floor(ext.read_traffic, w, g)


def layouts(device: str, sparsity: float) -> dict[str, tuple[list[torch.nn.Parameter], list[torch.Tensor]]]:
    """The encoder weights with gradients and masks, as 72 tensors and as one flat tensor (the
    same values and kept positions)."""
    gen = torch.Generator().manual_seed(0)
    shapes = encoder_shapes()
    weights = [torch.randn(s, generator=gen).mul_(0.02) for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(1e-3) for s in shapes]
    keeps = [torch.rand(s, generator=gen) >= sparsity for s in shapes]
    params = [torch.nn.Parameter(w.to(device)) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g.to(device)
    flat = torch.nn.Parameter(torch.cat([w.flatten() for w in weights]).to(device))
    flat.grad = torch.cat([g.flatten() for g in grads]).to(device)
    return {
        "72 tensors": (params, [pack_mask(k.to(device)) for k in keeps]),
        "flat": ([flat], [pack_mask(torch.cat([k.flatten() for k in keeps]).to(device))]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=9,
                        help="passes over all cases; the median over rounds evens out a noisy, shared machine")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--floor", action="store_true",
                        help="also time kernels that only move a step's bytes (CPU with AVX-512; compiled at start)")
    args = parser.parse_args()
    if args.floor and (args.device != "cpu" or torch.backends.cpu.get_cpu_capability() != "AVX512"):
        parser.error("--floor needs --device cpu on a CPU with AVX-512 that torch uses")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device

    max_err = check_correctness(device)
    print(f"correctness: max |MaskedAdamW - torch AdamW| over 5 steps = {max_err:.3g}")

    data = layouts(device, args.sparsity)
    numel = sum(p.numel() for p in data["flat"][0])
    kept = mask_nnz(data["flat"][1][0])
    pct = f"{args.sparsity:.0%}"
    floors = list(floor_cases(data["flat"][0][0], data["flat"][1][0])) if args.floor else []

    def cases(layout: str):
        params, masks = data[layout]
        group = lambda: [dict(params=params, masks=masks)]  # noqa: E731
        yield "torch AdamW fused", None, lambda: torch.optim.AdamW(params, lr=1e-4, fused=True)
        if layout == "72 tensors":  # over one tensor, foreach is the single-tensor path
            yield "torch AdamW foreach", None, lambda: torch.optim.AdamW(params, lr=1e-4, foreach=True)
        for cf in (True, False):  # bound as a default: the builders run after the loop moved on
            yield "ours dense state, no masks", cf, lambda cf=cf: MaskedAdamW(params, lr=1e-4, check_finite=cf)
            yield f"ours dense state, masks {pct}", cf, lambda cf=cf: MaskedAdamW(group(), lr=1e-4, check_finite=cf)
            yield f"ours compact state, masks {pct}", cf, lambda cf=cf: MaskedAdamW(
                group(), lr=1e-4, compact=True, check_finite=cf)
        if layout == "flat":
            for name, build in floors:
                yield name, None, build

    keys = [(layout, name, check_finite) for layout in data for name, check_finite, _ in cases(layout)]
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    state_bytes: dict[tuple, int] = {}
    # Round-robin over the cases, in alternating order, so that load from other processes hits
    # them alike.
    for round_ in range(args.rounds):
        order = [(layout, case) for layout in data for case in cases(layout)]
        for layout, (name, check_finite, build) in order if round_ % 2 == 0 else reversed(order):
            opt = build()
            key = (layout, name, check_finite)
            times[key].append(harness.median_time(opt.step, device, repeats=args.repeats, warmup=2))
            state_bytes[key] = opt.state_nbytes() if hasattr(opt, "state_nbytes") else torch_state_nbytes(opt)
            del opt
            gc.collect()

    def paired(key, base_layout: str) -> float:
        base = times[(base_layout, "torch AdamW fused", None)]
        return statistics.median(t / b for t, b in zip(times[key], base))

    rows = []
    for key in keys:
        layout, name, check_finite = key
        fused_bytes = state_bytes[(layout, "torch AdamW fused", None)]
        rows.append({
            "layout": layout,
            "optimizer": name,
            "check_finite": "" if check_finite is None else str(check_finite),
            "step_ms": statistics.median(times[key]) * 1e3,
            "vs_fused_72": paired(key, "72 tensors"),
            "vs_fused_flat": paired(key, "flat"),
            "state_MB": state_bytes[key] / 2**20,
            "state_vs_fused": state_bytes[key] / fused_bytes,
            "rounds_ms": [round(t * 1e3, 1) for t in times[key]],
        })
    name = "optim" if args.threads is None else f"optim_{args.threads}thread"
    harness.report(name, rows, device, extra={
        "params": numel, "kept": kept, "sparsity": args.sparsity, "repeats": args.repeats, "rounds": args.rounds,
        "correctness_max_abs_err": max_err,
        "note": "one step() over BERT-base encoder weights; vs_fused_*: median over rounds of the ratio to torch's "
                "fused AdamW in the same round; state_MB includes step counters and, for compact state, the "
                "copies of the masks the state was compacted for",
    })


if __name__ == "__main__":
    main()
