"""Interleaved timing: on a shared machine, load from other processes then hits every variant alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, device=None) -> dict[str, float]:
    """Median seconds of each fn over `rounds` rounds that each run every fn once, in turn, after one
    warm-up round (caches, allocator, lazy initialisation). CUDA work is synchronised around each call."""
    cuda = torch.device(device).type == "cuda" if device is not None else False
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            if r:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}
