"""Global top-k masks over the BERT-base encoder weights vs torch.kthvalue (torch.topk on CUDA).

Correctness first (masks equal a stable-sort reference on a smaller model; exact kept count on
the full one), then median timings, then the extra memory of one topk_mask call measured as the
peak-RSS growth of a fresh subprocess (CPU) or the CUDA allocator's peak (GPU).

    python benchmarks/bench_topk.py [--device cpu|cuda] [--repeats 5] [--sparsity 0.9]
"""
import argparse
import json
import pathlib
import resource
import subprocess
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

import sparsebert  # noqa: E402,F401
from sparsebert.ops import kept_count, mask_nnz, unpack_mask  # noqa: E402
from sparsebert.ops import select as S  # noqa: E402
from sparsebert.ops import topk as T  # noqa: E402


def bert_weights(hidden=768, inter=3072, layers=12, device="cpu", seed=0):
    """The Linear weights of a BERT-base encoder: per layer Q, K, V, O, FFN in, FFN out."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden), (hidden, inter)]
    return [torch.randn(s, generator=g).to(device) for _ in range(layers) for s in shapes]


def reference_masks(ws, k):
    """Stable sort of |w| over all weights: the k largest, lower flat index first among ties."""
    flat = torch.cat([w.abs().float().flatten().cpu() for w in ws])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return [part.reshape(w.shape) for part, w in zip(keep.split([w.numel() for w in ws]), ws)]


def check(device, sparsity):
    small = bert_weights(hidden=96, inter=384, layers=2, device=device, seed=1)
    k = kept_count(sum(w.numel() for w in small), sparsity)
    masks, _ = S.topk_masks(small, sparsity=sparsity)
    for m, want, w in zip(masks, reference_masks(small, k), small):
        assert torch.equal(unpack_mask(m, w.shape[-1]).cpu(), want), "topk_mask differs from the reference"
    print(f"correctness: masks equal the stable-sort reference on {len(small)} small tensors (k={k})")


def _proc_status(field):
    """A memory field of /proc/self/status in bytes."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def measure_memory(device, sparsity):
    """Peak memory growth of one topk_mask call over the weights (run in a fresh process on CPU)."""
    ws = bert_weights(device=device)
    weight_bytes = sum(w.numel() * w.element_size() for w in ws)
    k = kept_count(sum(w.numel() for w in ws), sparsity)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        T.topk_mask(ws, k)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        how = "torch.cuda.max_memory_allocated() growth during one call"
    else:
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
            before = _proc_status("VmRSS")
            T.topk_mask(ws, k)
            extra = _proc_status("VmHWM") - before
            how = "peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before one call, outputs included"
        except OSError:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            T.topk_mask(ws, k)
            extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            how = "ru_maxrss growth during the first call of a fresh process, outputs included"
    return {"weight_bytes": weight_bytes, "extra_bytes": extra, "extra_fraction": extra / weight_bytes, "how": how}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:
        print(json.dumps(measure_memory(args.device, args.sparsity)))
        return

    device, sparsity = args.device, args.sparsity
    check(device, sparsity)
    ws = bert_weights(device=device)
    n = sum(w.numel() for w in ws)
    k = kept_count(n, sparsity)
    masks, threshold = S.topk_masks(ws, sparsity=sparsity)
    assert sum(mask_nnz(m) for m in masks) == k, "kept count differs from N - floor(sparsity * N)"
    print(f"correctness: {n} weights, exactly {k} kept, threshold {float(threshold):.6g}")

    flat = torch.cat([w.abs().flatten() for w in ws])  # not counted against the baseline
    time = lambda fn: harness.median_time(fn, device, repeats=args.repeats, warmup=1)  # noqa: E731
    rows = []

    def row(name, ours, baseline_name, baseline):
        rows.append({"op": name, "ours_ms": ours * 1e3, "baseline": baseline_name, "baseline_ms": baseline * 1e3,
                     "speedup": baseline / ours})

    ours = time(lambda: T.topk_mask(ws, k))
    kth = time(lambda: torch.kthvalue(flat.cpu() if device == "cpu" else flat, n - k + 1))
    row(f"global top-k masks, {n / 1e6:.1f}M, {sparsity:.0%}", ours, "torch.kthvalue on cat |w|", kth)
    if device.startswith("cuda"):
        row(f"global top-k masks, {n / 1e6:.1f}M, {sparsity:.0%}", ours, "torch.topk on cat |w|",
            time(lambda: torch.topk(flat, k, sorted=False)))
    per_tensor = [kept_count(w.numel(), sparsity) for w in ws]
    ours_t = time(lambda: [T.topk_mask([w], kw) for w, kw in zip(ws, per_tensor)])
    flats = [w.abs().flatten() for w in ws]
    kth_t = time(lambda: [torch.kthvalue(f, f.numel() - kw + 1) for f, kw in zip(flats, per_tensor)])
    row("per-tensor top-k masks", ours_t, "torch.kthvalue per |w|", kth_t)
    del flat, flats

    proc = subprocess.run([sys.executable, __file__, "--memory-only", "--device", device, "--sparsity", str(sparsity)],
                          capture_output=True, text=True, check=True)
    memory = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"extra memory: {memory['extra_bytes'] / 2**20:.1f} MiB = {memory['extra_fraction']:.2%} of the "
          f"{memory['weight_bytes'] / 2**20:.0f} MiB of weights ({memory['how']}); bit masks alone are "
          f"{sum(m.numel() for m in masks) / memory['weight_bytes']:.2%}")
    harness.report("topk", rows, device, extra={"memory": memory, "sparsity": sparsity, "k": k, "n": n})


if __name__ == "__main__":
    main()
