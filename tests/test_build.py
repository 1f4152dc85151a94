"""What the compiled extension was built with."""
import torch

import sparsebert


def test_backends_name_the_compiled_kernels():
    assert sparsebert.backends[0] == "cpu"
    assert set(sparsebert.backends) <= {"cpu", "cuda"}
    assert ("cuda" in sparsebert.backends) == bool(sparsebert._C.with_cuda)


def test_cpu_kernels_use_torchs_threads():
    # at::parallel_for is an OpenMP region inlined into our objects; a build without -fopenmp
    # compiles it to a serial loop and every CPU kernel silently runs on one thread.
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert sparsebert.cpu_parallel
