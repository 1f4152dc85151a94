"""The emulated CUDA tests again, with the kernels and the runtime built with AddressSanitizer.

Out-of-bounds accesses do not depend on the thread order, so one schedule (random) is enough;
the mutants are left out (their checks fail on purpose). The run is a child pytest, since the
sanitizer must be preloaded into the Python process (see README.md).
"""
import os
import pathlib
import subprocess
import sys

import pytest

from cuda_emulation import build

ROOT = build.ROOT


def runtime_library(name: str) -> str | None:
    cxx = os.environ.get("CXX", "g++")
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and pathlib.Path(path).exists() else None


@pytest.mark.slow
@pytest.mark.skipif(build.asan_enabled(), reason="this is the sanitized run itself")
def test_emulated_kernels_under_address_sanitizer(tmp_path):
    libasan, libstdcxx = runtime_library("libasan.so"), runtime_library("libstdc++.so")
    if libasan is None or libstdcxx is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    env = dict(
        os.environ,
        SPARSEBERT_EMU_ASAN="1",
        # libstdc++ too, so that ASan finds the real __cxa_throw to intercept (Python does not link it).
        LD_PRELOAD=f"{libasan} {libstdcxx}",
        ASAN_OPTIONS="detect_leaks=0",
    )
    selection = "not cuda_emu-forward and not cuda_emu-reverse and not mutant and not address_sanitizer"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "cuda_emulation", "-k",
           selection, str(ROOT / "tests")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}"
    assert " passed" in proc.stdout.splitlines()[-1]
