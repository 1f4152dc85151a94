import fractions
import math
import os
import pathlib

import pytest
import torch

import sparsebert
from cuda_emulation import harness
from cuda_emulation.harness import EmulatedCuda, cpu_kernels  # noqa: F401  (for the op tests)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

HAS_CUDA = torch.cuda.is_available() and "cuda" in sparsebert.backends

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of sparsebert")
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the shared data sets at {DATA}")


def devices():
    """The devices every op test runs on: cpu, cuda when present, and the CUDA kernels emulated
    on the CPU under each schedule (tests/cuda_emulation)."""
    return ["cpu", *cuda_devices()]


def cuda_devices():
    """The devices that run the CUDA kernels: cuda when present, and the emulated ones."""
    return [*(["cuda"] if HAS_CUDA else []), *harness.emulated_devices()]


def runs_cuda_kernels(device) -> bool:
    return device == "cuda" or is_emulated(device)


def is_emulated(device) -> bool:
    return isinstance(device, EmulatedCuda)


def _emulated_param(item) -> EmulatedCuda | None:
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return next((v for v in params if isinstance(v, EmulatedCuda)), None)


def kept_oracle(count: int, sparsity: float) -> int:
    """Weights a sparsity keeps out of count by the documented rule: floor of the exact product of
    count and the decimal the sparsity is written as (its repr)."""
    return count - math.floor(fractions.Fraction(repr(sparsity)) * count)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_make_parametrize_id(config, val, argname):
    if isinstance(val, EmulatedCuda):
        return repr(val)
    return None


def pytest_collection_modifyitems(config, items):
    harness_tests = pathlib.Path(harness.__file__).parent
    for item in items:
        if _emulated_param(item) is not None or item.path.is_relative_to(harness_tests):
            item.add_marker(pytest.mark.cuda_emulation)


@pytest.fixture(autouse=True)
def _emulated_cuda_kernels(request):
    """On an emulated device, the test's sparsebert ops run the CUDA kernels (see harness.py)."""
    device = _emulated_param(request.node)
    if device is None:
        yield
        return
    with harness.emulate(device.schedule, request.node.nodeid):
        yield
