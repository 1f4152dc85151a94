import fractions
import math
import os
import pathlib

import pytest
import torch

import sparsebert

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

HAS_CUDA = torch.cuda.is_available() and "cuda" in sparsebert.backends

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of sparsebert")
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the shared data sets at {DATA}")


def devices():
    """The devices every op test runs on: cpu, and cuda when present."""
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def kept_oracle(count: int, sparsity: float) -> int:
    """Weights a sparsity keeps out of count by the documented rule: floor of the exact product of
    count and the decimal the sparsity is written as (its repr)."""
    return count - math.floor(fractions.Fraction(repr(sparsity)) * count)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
