"""Command line of `python -m sparsebert.deploy`."""
from __future__ import annotations

import argparse
import pathlib
import sys

DESCRIPTION = """\
Deploy a pruned model: compress it and run its pruned Linear layers on sparse kernels.

  convert SOURCE OUT   SOURCE (a run directory, a sparse checkpoint, an exported transformers model
                       or a deployed model) -> OUT, a deployed model: config.json, tokenizer files and
                       compressed_model.safetensors (bit mask + kept values per pruned matrix, hashed).
                       Each pruned layer gets the faster of the sparse kernel and dense GEMM.
  bench MODEL          dense vs sparse forward latency and throughput on this machine (the outputs are
                       compared first); written into MODEL's report.md and inference.json when MODEL is a
                       run directory.

Examples:
  python -m sparsebert.deploy convert runs/20260101-120000-downstream-cap deployed/cap-sst2
  python -m sparsebert.deploy bench runs/20260101-120000-downstream-cap --tokens 128,4096 --threads 1,2
  python -m sparsebert.deploy bench deployed/cap-sst2
Load a deployed model in Python with sparsebert.deploy.from_pretrained("deployed/cap-sst2").
"""


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def timing_list(text: str) -> list[int]:
    return [] if text.strip().lower() in ("", "none", "0") else int_list(text)


def build_parser() -> argparse.ArgumentParser:
    from .convert import KERNELS

    parser = argparse.ArgumentParser(prog="python -m sparsebert.deploy", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    kernel = dict(choices=KERNELS, default="auto",
                  help="per-layer kernel: auto (the faster of sparse and dense), sparse, dense, or 2:4 (PyTorch "
                       "semi-structured, CUDA 8.0+ GPUs only)")
    timing = dict(type=timing_list, default=[128], metavar="N[,N...]|none",
                  help="token counts at which auto times the layers that sparsity does not decide (40-60%%, or "
                       "off the CPU's AVX-512 kernel) (default 128; none: those stay dense)")

    c = sub.add_parser("convert", help="compress a pruned model into a deployed model")
    c.add_argument("source")
    c.add_argument("out")
    c.add_argument("--kernel", **kernel)
    c.add_argument("--timing-tokens", **timing)
    c.add_argument("--device", default="cpu")
    c.add_argument("--force", action="store_true", help="replace OUT if it is a deployed model")

    b = sub.add_parser("bench", help="dense vs sparse latency and throughput")
    b.add_argument("model")
    b.add_argument("--tokens", type=int_list, default=[128, 4096], metavar="N[,N...]",
                   help="tokens per forward pass (default 128,4096; above --seq-len, batches of --seq-len)")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--threads", type=int_list, default=None, metavar="N[,N...]",
                   help="torch thread counts (default: torch's current)")
    b.add_argument("--rounds", type=int, default=5, help="timed rounds, each running both models once")
    b.add_argument("--kernel", **kernel)
    b.add_argument("--timing-tokens", **timing)
    b.add_argument("--device", default=None, help="cpu (default) or cuda")
    b.add_argument("--no-report", action="store_true", help="do not write into a run directory's report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .files import DeployFormatError

    try:
        return convert_command(args) if args.command == "convert" else bench_command(args)
    except (ValueError, FileNotFoundError, FileExistsError, DeployFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def convert_command(args) -> int:
    from . import bench, files
    from .convert import LayerPlan

    dense, model, _ = bench.models_for(args.source, kernel=args.kernel, timing_tokens=tuple(args.timing_tokens),
                                       device=args.device)
    print(f"{'layer':<52} {'shape':>10} {'sparsity':>8} {'R':>2} {'kernel':>7}  reason")
    for layer in model.sparsebert_deploy["layers"]:
        plan = LayerPlan(**layer)
        print(f"{plan.name:<52} {plan.out_features:>5}x{plan.in_features:<4} {plan.sparsity:>8.3f} {plan.block_rows:>2} "
              f"{plan.kernel:>7}  {plan.reason}")
    diff = bench.check_agreement(dense, model, bench.make_inputs(dense, 64, 32, seed=1))
    out = files.save_pretrained(model, args.out, overwrite=args.force)
    size = bench.size_summary(model)
    print(f"outputs agree with the dense model: max relative difference {diff:.2g}")
    print(f"pruned matrices: {size['compressed_bytes'] / 1e6:.2f} MB stored = {100 * size['ratio']:.1f}% of dense "
          f"float32 ({size['dense_fp32_bytes'] / 1e6:.2f} MB)")
    print(f"wrote {out}")
    return 0


def bench_command(args) -> int:
    from . import bench

    print(bench.HEADER)
    print("|---" * 8 + "|")
    result = bench.bench(args.model, tokens=args.tokens, threads=args.threads, seq_len=args.seq_len,
                         rounds=args.rounds, kernel=args.kernel, timing_tokens=tuple(args.timing_tokens),
                         device=args.device)
    print()
    print(bench.format_result(result).split("\n\n", 1)[1])
    path = pathlib.Path(args.model)
    if not args.no_report and path.is_dir() and ((path / "done.json").is_file() or (path / "report.md").is_file()):
        for written in bench.write_report(path, result):
            print(f"wrote {written}")
    return 0
