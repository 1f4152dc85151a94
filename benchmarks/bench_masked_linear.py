"""masked_linear against dense F.linear and the unfused float-mask baseline, BERT-base shapes.

    python benchmarks/bench_masked_linear.py [--device cpu|cuda] [--repeats 15] [--sparsity 0.9]

Rows: forward+backward and forward-only times (median of repeats) of
  dense    F.linear(x, W, b)                    (the floor: no masking at all)
  unfused  F.linear(x, W * M_float, b)          (autograd's mul masks grad_W in a separate pass)
  general  masked_linear(x, W, mask, b)         (any W; mask fused into the kernels)
  masked   masked_linear(..., weight_is_masked=True) (W already zero where pruned)
  movement movement_linear(x, W, S, mask, b)    (also produces grad_S)
with ratios against dense and unfused: medians over the rounds of the ratio within a round.
"""
import argparse
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

from sparsebert.ops import masked_linear, movement_linear, pack_mask  # noqa: E402

SHAPES = [(4096, 768, 3072), (4096, 768, 768)]  # (tokens, in_features, out_features)


def setup(tokens, n_in, n_out, sparsity, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g).to(device, dtype)
    w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(device, dtype)
    b = torch.randn(n_out, generator=g).to(device, dtype)
    s = torch.randn(n_out, n_in, generator=g).to(device, dtype)
    keep = (torch.rand(n_out, n_in, generator=g) >= sparsity).to(device)
    go = torch.randn(tokens, n_out, generator=g).to(device, dtype)
    return x, w, b, s, keep, go


def variants(x, w, b, s, keep, go):
    mask = pack_mask(keep)
    mask_f = keep.to(w.dtype)
    w_pre = (w * mask_f).contiguous()
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    x_, w_, w_pre_, b_, s_ = leaf(x), leaf(w), leaf(w_pre), leaf(b), leaf(s)
    forwards = {
        "dense": lambda: F.linear(x_, w_, b_),
        "unfused": lambda: F.linear(x_, w_ * mask_f, b_),
        "general": lambda: masked_linear(x_, w_, mask, b_),
        "masked": lambda: masked_linear(x_, w_pre_, mask, b_, weight_is_masked=True),
        "movement": lambda: movement_linear(x_, w_, s_, mask, b_),
    }
    params = [x_, w_, w_pre_, b_, s_]

    def fwd_bwd(forward):
        def run():
            for p in params:
                p.grad = None
            forward().backward(go)
        return run

    def fwd(forward):
        def run():
            with torch.no_grad():
                forward()
        return run

    grads = lambda: {"x": x_.grad, "w": w_.grad if w_.grad is not None else w_pre_.grad, "b": b_.grad, "s": s_.grad}  # noqa: E731
    return forwards, fwd_bwd, fwd, grads


def check(x, w, b, s, keep, go):
    """Every variant against a float64 reference before any timing."""
    forwards, fwd_bwd, _, grads = variants(x, w, b, s, keep, go)
    xd, wd, gd = x.double(), torch.where(keep, w, torch.zeros_like(w)).double(), go.double()
    y_ref = F.linear(xd, wd, b.double())
    g = gd.t() @ xd
    ref = {"x": gd @ wd, "w": torch.where(keep, g, torch.zeros_like(g)), "b": gd.sum(0), "s": g * w.double()}
    tol = dict(rtol=2e-3, atol=2e-3) if x.dtype == torch.float32 else dict(rtol=5e-2, atol=3e-1)
    for name in ("unfused", "general", "masked", "movement"):
        torch.testing.assert_close(forwards[name]().double(), y_ref, **tol, msg=lambda m: f"{name} forward: {m}")
        fwd_bwd(forwards[name])()
        got = grads()
        for key in ("x", "w", "b") + (("s",) if name == "movement" else ()):
            torch.testing.assert_close(got[key].double(), ref[key], **tol, msg=lambda m: f"{name} grad {key}: {m}")
        assert (got["w"][~keep] == 0).all(), f"{name}: grad_W not exactly zero at pruned positions"


def interleaved_rounds(runs, device, repeats):
    """Time of every variant in each of `repeats` rounds that run every variant once, in
    alternating order, so that load from other processes hits all variants alike instead of
    whichever ran then."""
    for run in runs.values():
        harness.median_time(run, device, repeats=1, warmup=1)
    samples = {name: [] for name in runs}
    for round_ in range(repeats):
        for name in (list(runs) if round_ % 2 == 0 else reversed(list(runs))):
            samples[name].append(harness.median_time(runs[name], device, repeats=1, warmup=0))
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])

    rows = []
    for dtype in dtypes:
        for tokens, n_in, n_out in SHAPES:
            tensors = setup(tokens, n_in, n_out, args.sparsity, args.device, dtype)
            check(*tensors)
            forwards, fwd_bwd, fwd, _ = variants(*tensors)
            for mode, wrap in (("fwd+bwd", fwd_bwd), ("fwd", fwd)):
                runs = {name: wrap(forward) for name, forward in forwards.items()}
                samples = interleaved_rounds(runs, args.device, args.repeats)
                # Ratios: the median over rounds of the ratio within a round, which a change of
                # load between rounds does not move (a ratio of medians would).
                paired = lambda name, base: statistics.median(  # noqa: E731
                    t / b for t, b in zip(samples[name], samples[base]))
                for name in forwards:
                    rows.append({
                        "dtype": str(dtype).removeprefix("torch."),
                        "shape": f"{tokens}x{n_in}->{n_out}",
                        "pass": mode,
                        "variant": name,
                        "ms": statistics.median(samples[name]) * 1e3,
                        "vs_dense": paired(name, "dense"),
                        "vs_unfused": paired(name, "unfused"),
                    })
    harness.report("masked_linear", rows, args.device,
                   extra={"sparsity": args.sparsity, "repeats": args.repeats, "correctness": "passed"})


if __name__ == "__main__":
    main()
