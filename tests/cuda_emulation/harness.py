"""The test-suite side of the CUDA emulation: emulated devices, schedules and op routing.

An op test parametrized over ``devices()`` (tests/conftest.py) also runs once per schedule on an
``EmulatedCuda`` device. Its tensors are CPU tensors; for the duration of the test the CPU kernels
of every sparsebert op are replaced by the emulated CUDA kernels (the CPU ops of namespace
sparsebert_emu), so the test's wrappers, autograd, opcheck and torch.compile all run the CUDA
code, and the test's own reference checks it. ``cpu_kernels()`` gives an emulated test back the
real CPU kernels, as the oracle.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import zlib

import torch

from . import build

NAMESPACE = build.NAMESPACE
SCHEDULES = ("forward", "reverse", "random")
# The random schedule's seed mixes SPARSEBERT_EMU_SEED (default 0) with the test's id: each test
# draws its own order, the same on every run; another SPARSEBERT_EMU_SEED draws new orders.
BASE_SEED = int(os.environ.get("SPARSEBERT_EMU_SEED", "0"))


class EmulatedCuda(str):
    """A device parameter for the emulated CUDA kernels: the device string "cpu" (where the
    tensors live), carrying the schedule the kernels run under."""

    schedule: str

    def __new__(cls, schedule: str) -> "EmulatedCuda":
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}")
        device = super().__new__(cls, "cpu")
        device.schedule = schedule
        return device

    def __repr__(self) -> str:
        return f"cuda_emu-{self.schedule}"


def emulated_devices() -> list[EmulatedCuda]:
    return [EmulatedCuda(s) for s in SCHEDULES]


def seed_for(test_id: str) -> int:
    return BASE_SEED * 1_000_003 + zlib.crc32(test_id.encode())


def emulated_op_names(library: build.Library) -> list[str]:
    """The ops of `library` that have (emulated CUDA) kernels."""
    prefix = f"{library.namespace}::"
    names = [n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)]
    return sorted(n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(prefix + n, "CPU"))


def checked(op, library: build.Library, name: str):
    """op, raising when it returns with a failed launch that nobody read with cudaGetLastError()
    (a GPU would lose that error, or report it at some later, unrelated check)."""

    def kernel(*args, **kwargs):
        library.take_last_error()
        out = op(*args, **kwargs)
        error = library.take_last_error()
        if error:
            raise RuntimeError(f"{name}: a kernel launch failed (cudaError {error}) and the op never checked "
                               "cudaGetLastError() (C10_CUDA_KERNEL_LAUNCH_CHECK)")
        return out

    return kernel


class Routing:
    """While installed, the CPU kernels of sparsebert's ops are the emulated CUDA kernels of
    `library`. Uninstalling restores the real CPU kernels (torch.library registrations stack)."""

    def __init__(self, library: build.Library):
        self.library = library
        self.names = emulated_op_names(library)
        self._lib: torch.library.Library | None = None

    def install(self) -> None:
        lib = torch.library.Library(NAMESPACE, "IMPL")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for name in self.names:
                op = getattr(self.library.ops, name).default
                lib.impl(name, checked(op, self.library, f"{NAMESPACE}::{name}"), "CPU")
        self._lib = lib

    def uninstall(self) -> None:
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None


_active: Routing | None = None


@contextlib.contextmanager
def emulate(schedule: str, test_id: str = "", library: build.Library | None = None):
    """sparsebert's ops run the emulated CUDA kernels under `schedule`, inside the block."""
    global _active
    library = library or build.main_library()
    library.set_schedule(schedule, seed_for(test_id))
    routing = Routing(library)
    routing.install()
    _active = routing
    try:
        with uninitialized_memory_filled():
            yield library
    finally:
        _active = None
        routing.uninstall()


@contextlib.contextmanager
def uninitialized_memory_filled():
    """torch.empty() and friends return NaN / the largest integer instead of whatever the allocator
    had (on a GPU: whatever the last kernel left), so that a kernel that reads an output it never
    wrote cannot pass by luck."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


@contextlib.contextmanager
def cpu_kernels():
    """Inside an emulated test: the real CPU kernels again (the oracle), for the block."""
    global _active
    routing = _active
    if routing is None:
        yield
        return
    routing.uninstall()
    _active = None
    try:
        yield
    finally:
        routing.install()
        _active = routing
