"""The process around a run: threads, device, precision, seeding, and moving batches."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .errors import StageError


def apply(run: dict) -> torch.device:
    """Set the CPU threads of a run's config and return its device."""
    if run["threads"]:
        torch.set_num_threads(int(run["threads"]))
    return resolve_device(run)


def resolve_device(run: dict) -> torch.device:
    dev = run["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"--device {dev}: no CUDA device is available")
    device = torch.device(dev)
    if run["precision"] == "fp16" and device.type != "cuda":
        raise StageError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
