"""Builds the emulated CUDA kernels into shared libraries of CPU ops, cached by content.

The kernels are the CUDA sources that CMakeLists.txt lists in SPARSEBERT_CUDA_SOURCES (the one
place a new .cu file is listed), rewritten by rewrite.py and compiled by g++ against the headers
in runtime/include. Every object file is named by the hash of everything that goes into it (its
rewritten source, every header it may include, the flags, the compiler and torch versions), so
a build compiles only what changed, and a second test session compiles nothing.

Libraries:
- ``sparsebert_emu``: the runtime, the schemas of csrc/registration.cpp (for its own namespace and
  for every mutant's), every CUDA source and the harness's own test kernels (kernels/*.cu);
- one per mutant (mutants.py): the runtime and the mutated source, in its own namespace, so that a
  deliberately broken copy never shares a symbol with the real one.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
from torch.utils.cpp_extension import include_paths, library_paths

from .mutants import MUTANTS
from .rewrite import rewrite, schema_unit

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNTIME = HERE / "runtime"
NAMESPACE = "sparsebert"
EMU_NAMESPACE = "sparsebert_emu"
SCHEMAS = "csrc/registration.cpp"
SELFTEST_NAMESPACE = "emu_selftest"  # the ops of kernels/*.cu, which define their own schemas


def cuda_sources() -> list[str]:
    """The CUDA sources of the extension, as CMakeLists.txt lists them."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"set\(SPARSEBERT_CUDA_SOURCES\s+([^)]*)\)", cmake)
    if m is None:
        raise RuntimeError("CMakeLists.txt has no set(SPARSEBERT_CUDA_SOURCES ...)")
    return m.group(1).split()


def selftest_sources() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (HERE / "kernels").glob("*.cu"))


def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SPARSEBERT_EMU_BUILD_DIR", ROOT / "build" / "cuda_emulation"))


def asan_enabled() -> bool:
    """SPARSEBERT_EMU_ASAN=1 builds (separately cached) and loads AddressSanitizer libraries; the
    process must then run with libasan preloaded (see README.md)."""
    return os.environ.get("SPARSEBERT_EMU_ASAN", "0") == "1"


@functools.cache
def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the CUDA emulation needs a C++ compiler; {cxx!r} is not on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    return cxx, version


def _flags() -> list[str]:
    flags = [
        "-std=c++20", "-O1", "-fPIC", "-g0",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DSPARSEBERT_WITH_CUDA=1",
        "-Wall", "-Wno-unused-parameter", "-Wno-unknown-pragmas",
        "-include", "cuda_runtime.h",
        f"-I{RUNTIME / 'include'}", f"-I{ROOT / 'csrc'}",
        *(f"-I{p}" for p in include_paths()),
    ]
    if asan_enabled():
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    return flags


@functools.cache
def _headers_digest() -> str:
    """Everything an emulated unit may include from the project and the harness."""
    h = hashlib.sha256()
    files = sorted([*(RUNTIME / "include").rglob("*"), *(ROOT / "csrc").glob("*.h")])
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    h.update(_compiler()[1].encode())
    h.update(torch.__version__.encode())
    h.update(" ".join(_flags()).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Unit:
    """One translation unit: its name (for messages) and its source text."""

    name: str
    text: str

    def key(self) -> str:
        return hashlib.sha256((_headers_digest() + self.text).encode()).hexdigest()[:24]


def _compile(unit: Unit, objects: pathlib.Path) -> pathlib.Path:
    out = objects / f"{unit.key()}.o"
    if out.exists():
        return out
    src = objects / f"{unit.key()}.cpp"
    src.write_text(unit.text)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([_compiler()[0], *_flags(), "-c", str(src), "-o", str(tmp)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"CUDA emulation: compiling {unit.name} failed:\n{proc.stderr[-20000:]}")
    os.replace(tmp, out)
    return out


def _build(libraries: dict[str, list[Unit]]) -> dict[str, pathlib.Path]:
    """Compiles the units of all `libraries` (name -> units) in one pool of compilers, then links
    each library."""
    root = build_dir() / ("asan" if asan_enabled() else "release")
    objects = root / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be building the same objects
        units = {u.key(): u for us in libraries.values() for u in us}
        workers = max(1, min(len(units), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            compiled = dict(zip(units, pool.map(lambda u: _compile(u, objects), units.values())))
        return {name: _link(root, name, [compiled[u.key()] for u in us]) for name, us in libraries.items()}


def _link(root: pathlib.Path, name: str, objs: list[pathlib.Path]) -> pathlib.Path:
    key = hashlib.sha256("".join(o.name for o in objs).encode()).hexdigest()[:24]
    lib = root / f"lib{name}-{key}.so"
    if lib.exists():
        return lib
    libdirs = library_paths()
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [_compiler()[0], "-shared", "-o", str(tmp), *map(str, objs),
           *(f"-L{d}" for d in libdirs), *(f"-Wl,-rpath,{d}" for d in libdirs), "-lc10", "-ltorch_cpu", "-ltorch"]
    if asan_enabled():
        cmd.append("-fsanitize=address")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"CUDA emulation: linking {name} failed:\n{proc.stderr[-20000:]}")
    os.replace(tmp, lib)
    return lib


def _source_unit(path: str, namespaces: dict[str, str], text: str | None = None) -> Unit:
    text = (ROOT / path).read_text() if text is None else text
    return Unit(path, rewrite(text, path, namespaces))


def _runtime_unit() -> Unit:
    path = RUNTIME / "runtime.cpp"
    return Unit("runtime.cpp", f'#line 1 "{path.relative_to(ROOT)}"\n' + path.read_text())


def _schema_unit(namespaces: list[str]) -> Unit:
    return Unit(SCHEMAS, schema_unit((ROOT / SCHEMAS).read_text(), SCHEMAS, NAMESPACE, namespaces))


class Library:
    """A loaded emulation library: its op namespace and its runtime's controls."""

    def __init__(self, path: pathlib.Path, namespace: str):
        self.path = path
        self.namespace = namespace
        torch.ops.load_library(str(path))
        self._dll = ctypes.CDLL(str(path))
        self._dll.emu_set_schedule.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
        self._dll.emu_set_schedule.restype = ctypes.c_int
        self._dll.emu_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
        self._dll.emu_take_last_error.restype = ctypes.c_int

    def set_schedule(self, policy: str, seed: int = 0) -> None:
        if self._dll.emu_set_schedule(policy.encode(), seed) != 0:
            raise ValueError(f"unknown schedule {policy!r}")

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_int64 * 6)()
        self._dll.emu_stats(out)
        names = ("launches", "blocks", "threads", "barriers", "warp_collectives", "switches")
        return dict(zip(names, out))

    def take_last_error(self) -> int:
        return self._dll.emu_take_last_error()

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)


def _remember_failure(build_fn):
    """functools.cache that also caches a failed build: one compile error per session, not one
    rebuild per emulated test."""
    results: dict = {}

    @functools.wraps(build_fn)
    def wrapper(*args):
        if args not in results:
            try:
                results[args] = (build_fn(*args), None)
            except Exception as e:  # noqa: BLE001  (re-raised, to every caller)
                results[args] = (None, e)
        value, error = results[args]
        if error is not None:
            raise error
        return value

    return wrapper


@_remember_failure
def main_library() -> Library:
    """Every CUDA source (and the harness's test kernels), registered as CPU ops of sparsebert_emu."""
    units = [_runtime_unit(), _schema_unit([EMU_NAMESPACE, *(m.namespace for m in MUTANTS)])]
    units += [_source_unit(p, {NAMESPACE: EMU_NAMESPACE}) for p in cuda_sources()]
    units += [_source_unit(p, {SELFTEST_NAMESPACE: SELFTEST_NAMESPACE}) for p in selftest_sources()]
    return Library(_build({EMU_NAMESPACE: units})[EMU_NAMESPACE], EMU_NAMESPACE)


@_remember_failure
def mutant_libraries() -> dict[str, Library]:
    """The library of each deliberately broken kernel (mutants.py), each in its own namespace; by name."""
    main_library()  # defines the mutants' schemas
    units = {
        m.namespace: [_runtime_unit(), _source_unit(m.source, {NAMESPACE: m.namespace},
                                                    m.apply((ROOT / m.source).read_text()))]
        for m in MUTANTS
    }
    paths = _build(units)
    return {m.name: Library(paths[m.namespace], m.namespace) for m in MUTANTS}
