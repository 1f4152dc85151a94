"""Shared timing and reporting for the op benchmarks: medians of repeated runs, ratios
against the PyTorch baseline measured in the same run, a printed table and a JSON file."""
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Callable

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str = "cpu", repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
    }
    return env


def report(name: str, rows: list[dict], device: str, extra: dict | None = None) -> pathlib.Path:
    """Print rows as a table and write them, with the environment, to results/<name>_<device>.json."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{device.split(':')[0]}.json"
    # Atomically: bench_methods processes read the file back while another may be writing it.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "environment": environment(device), "rows": rows, **(extra or {})}, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
