"""Dense vs sparse latency and throughput of a whole model on this machine, and its section of a run's report."""
from __future__ import annotations

import copy
import datetime
import json
import os
import pathlib
import platform
import re

import torch
from torch import nn

from . import sources
from .convert import convert
from .files import from_pretrained
from .timing import interleaved_medians

# Agreement of the deployed model with the dense-with-zeros model, relative to the largest output
# (float32: the kernels only reorder the sums; 16-bit: one more rounding per layer).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
REPORT_BEGIN, REPORT_END = "<!-- sparsebert.deploy bench -->", "<!-- /sparsebert.deploy bench -->"


def make_inputs(model: nn.Module, tokens: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of tokens // seq_len random sequences (one sequence of `tokens` when tokens <= seq_len)."""
    seq = min(tokens, seq_len)
    if tokens % seq:
        raise ValueError(f"tokens ({tokens}) must be a multiple of the sequence length {seq}")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(100, vocab - 1), vocab, (tokens // seq, seq), generator=g)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def first_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


def check_agreement(dense: nn.Module, sparse: nn.Module, inputs: dict) -> float:
    """Max |sparse - dense| over the first output, relative to max |dense|; raises beyond TOLERANCE."""
    ref, got = first_output(dense, inputs), first_output(sparse, inputs)
    diff = float((got.float() - ref.float()).abs().max()) / max(1.0, float(ref.float().abs().max()))
    tol = TOLERANCE[ref.dtype]
    if not diff <= tol:
        raise RuntimeError(f"the sparse model disagrees with the dense one: relative max difference {diff:.3g} > {tol}")
    return diff


def models_for(source, *, kernel: str = "auto", timing_tokens=(128,), device=None) -> tuple[nn.Module, nn.Module, sources.Source]:
    """(dense-with-zeros model, deployed model, source) of a model or path. A deployed model keeps its
    stored kernel choices unless `kernel` asks for another choice or timing_tokens for a new timing."""
    src = sources.load(source)
    dense = copy.deepcopy(src.model) if device is None else copy.deepcopy(src.model).to(device)
    if src.kind != "deployed model":
        return dense, convert(src, kernel=kernel, timing_tokens=timing_tokens, device=device), src
    keep_choices = kernel == "auto" and not timing_tokens
    sparse = from_pretrained(src.directory, device=device or "cpu", kernel=None if keep_choices else kernel,
                             timing_tokens=timing_tokens)
    return dense, sparse, src


def size_summary(model: nn.Module) -> dict:
    """Bytes of the prunable matrices: dense float32 against the compressed file's mask + values."""
    layers = model.sparsebert_deploy["layers"]
    itemsize = next(model.parameters()).element_size()
    dense = sum(4 * l["out_features"] * l["in_features"] for l in layers)
    stored = sum(l["out_features"] * ((l["in_features"] + 7) // 8) + l["nnz"] * itemsize for l in layers)
    return {"dense_fp32_bytes": dense, "compressed_bytes": stored, "ratio": stored / dense}


def bench(source, *, tokens=(128, 4096), threads=None, seq_len: int = 128, rounds: int = 5, kernel: str = "auto",
          timing_tokens=(128,), device=None, log=print) -> dict:
    """Correctness first, then dense vs sparse forward latency at each token count and thread count."""
    dense, sparse, src = models_for(source, kernel=kernel, timing_tokens=timing_tokens, device=device)
    diff = check_agreement(dense, sparse, make_inputs(dense, min(tokens), seq_len, seed=1))
    old_threads = torch.get_num_threads()
    rows = []
    try:
        for n in threads or [old_threads]:
            torch.set_num_threads(n)
            for t in tokens:
                inputs = make_inputs(dense, t, seq_len)
                fns = {"dense": lambda: first_output(dense, inputs), "sparse": lambda: first_output(sparse, inputs)}
                ms = {k: v * 1e3 for k, v in interleaved_medians(fns, rounds, inputs["input_ids"].device).items()}
                batch, seq = inputs["input_ids"].shape
                rows.append({"threads": n, "tokens": t, "batch": f"{batch}x{seq}", "dense_ms": ms["dense"],
                             "sparse_ms": ms["sparse"], "speedup": ms["dense"] / ms["sparse"],
                             "dense_tokens_per_s": t / ms["dense"] * 1e3, "sparse_tokens_per_s": t / ms["sparse"] * 1e3})
                log(format_row(rows[-1]))
    finally:
        torch.set_num_threads(old_threads)
    kernels = [l["kernel"] for l in sparse.sparsebert_deploy["layers"]]
    return {"model": str(src.directory) if src.directory else type(dense).__name__, "source": src.kind,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "rounds": rounds, "max_relative_difference": diff,
            "layers": {k: kernels.count(k) for k in sorted(set(kernels))}, "size": size_summary(sparse), "rows": rows}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.*)", pathlib.Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average": load}


HEADER = "| threads | tokens | batch | dense ms | sparse ms | speedup | dense tokens/s | sparse tokens/s |"


def format_row(row: dict) -> str:
    return (f"| {row['threads']} | {row['tokens']} | {row['batch']} | {row['dense_ms']:.2f} | {row['sparse_ms']:.2f} | "
            f"{row['speedup']:.2f}x | {row['dense_tokens_per_s']:.0f} | {row['sparse_tokens_per_s']:.0f} |")


def format_result(result: dict) -> str:
    size, load = result["size"], result["machine"]["load_average"]
    lines = [HEADER, "|---" * 8 + "|", *(format_row(r) for r in result["rows"]), "",
             f"- layers: {', '.join(f'{n} {k}' for k, n in result['layers'].items())}; prunable matrices stored in "
             f"{size['compressed_bytes'] / 1e6:.2f} MB = {100 * size['ratio']:.1f}% of dense float32 "
             f"({size['dense_fp32_bytes'] / 1e6:.2f} MB)",
             f"- outputs: max |sparse - dense| = {result['max_relative_difference']:.2g} (relative to max |dense|)",
             f"- {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']} "
             f"({result['machine']['cpu_capability']}), load average {', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}; "
             f"median of {result['rounds']} interleaved rounds, {result['date']}"]
    return "\n".join(lines)


def write_report(run_dir, result: dict) -> list[pathlib.Path]:
    """<run>/inference.json, and the section of <run>/report.md between the bench markers (replaced, or
    appended when absent). Both are written atomically."""
    from ..train.runs import atomic_write_text

    run_dir = pathlib.Path(run_dir)
    atomic_write_text(run_dir / "inference.json", json.dumps(result, indent=1) + "\n")
    section = "\n".join([REPORT_BEGIN, "## Inference: sparse vs dense", "",
                         "`python -m sparsebert.deploy bench` (forward pass, no gradients)", "",
                         format_result(result), REPORT_END])
    report = run_dir / "report.md"
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    pattern = re.compile(re.escape(REPORT_BEGIN) + r".*?" + re.escape(REPORT_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + ("\n\n" if text else "") + section
    atomic_write_text(report, text + "\n" if not text.endswith("\n") else text)
    return [run_dir / "inference.json", report]
