"""The CUDA sparse_linear kernel against the CPU op as the oracle, at the launch geometries of the
CUDA kernel: token tiles of 32 (one token a lane), output tiles of 32 rows (8 row blocks of 4 when
R = 4), 32 x 32 transpose tiles, partial tiles of each; dense, all-pruned and empty rows; int16
and int32 columns; every argument error, and corrupt index arrays.

Runs on a GPU when there is one, and on the emulation harness under every schedule.
"""
import pytest
import torch

from conftest import cpu_kernels, cuda_devices, is_emulated
from sparsebert.ops import pack_sparse

ops = torch.ops.sparsebert
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading shape of x, in_features, out_features): tokens below, at and past a 32-token tile;
# features below and past a 32-feature transpose tile; outputs below, at and past a 32-row tile,
# and (36, 100) row tiles whose last 4-row blocks are past out_features.
SHAPES = [
    ((1,), 5, 4),
    ((31,), 32, 32),
    ((33,), 33, 36),
    ((2, 3, 11), 70, 100),
    ((65,), 17, 64),
]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def tolerances(dtype):
    # Both accumulate in float32, in the same order but with and without FMA; 16-bit outputs are rounded once.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)


def weight(n_out, n_in, sparsity, block_rows, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    keep = torch.rand(n_out // block_rows, 1, n_in, generator=g) >= sparsity
    keep = keep.expand(-1, block_rows, -1).reshape(n_out, n_in)
    return torch.where(keep, w, 0.0).to(dtype)


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def both(device, x, packed, bias):
    """(the kernel's output on device, the CPU op's output), both on the CPU."""
    got = ops.sparse_linear(*on(device, x, *packed[:3], bias)).cpu()
    with cpu_kernels():
        want = ops.sparse_linear(x, *packed[:3], bias)
    return got, want


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
@pytest.mark.parametrize("block_rows", [1, 4])
def test_matches_the_cpu_op(device, dtype, lead, n_in, n_out, block_rows):
    x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n_out).to(dtype)
    for i, sparsity in enumerate(SPARSITIES):
        packed = pack_sparse(weight(n_out, n_in, sparsity, block_rows, i, dtype), block_rows=block_rows)
        for b in (bias, None):
            got, want = both(device, x, packed, b)
            assert got.shape == want.shape == (*lead, n_out) and got.dtype == dtype
            torch.testing.assert_close(got, want, **tolerances(dtype), msg=lambda m: f"sparsity {sparsity}: {m}")
            if sparsity == 1.0:  # nothing to sum: exactly the bias (or 0)
                assert torch.equal(got, torch.zeros_like(got) if b is None else b.expand_as(got))


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("block_rows", [1, 4])
def test_empty_rows_and_row_tiles(device, block_rows):
    w = weight(96, 40, 0.3, block_rows, 3, torch.float32)
    w[:32] = 0  # a whole 32-row tile
    w[40:48] = 0  # two 4-row blocks inside a tile
    w[-4:] = 0  # the last rows
    x, bias = torch.randn(45, 40), torch.randn(96)
    got, want = both(device, x, pack_sparse(w, block_rows=block_rows), bias)
    torch.testing.assert_close(got, want, **tolerances(torch.float32))
    for rows in (slice(0, 32), slice(40, 48), slice(92, 96)):
        assert torch.equal(got[:, rows], bias[rows].expand(45, -1))


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("layout", ["transposed", "strided rows", "expanded"])
def test_non_contiguous_x(device, layout):
    base = torch.randn(3, 80, 90)
    x = {"transposed": base[0, :40, :].t(), "strided rows": base[:, ::3, :40],
         "expanded": base[0, :1, :40].expand(65, 40)}[layout]
    got, want = both(device, x, pack_sparse(weight(36, 40, 0.8, 4, 4, torch.float32)), None)
    torch.testing.assert_close(got, want, **tolerances(torch.float32))


@pytest.mark.parametrize("device", cuda_devices())
def test_int32_columns(device):
    w = weight(8, 33000, 0.999, 1, 5, torch.float32)
    packed = pack_sparse(w)
    assert packed.columns.dtype == torch.int32
    got, want = both(device, torch.randn(3, 33000), packed, torch.randn(8))
    torch.testing.assert_close(got, want, **tolerances(torch.float32))


def argument_errors():
    """Calls with a bad argument; the checks are shared by both bindings, so the messages are too."""
    v, c, o, _ = pack_sparse(weight(8, 13, 0.5, 1, 6, torch.float32))
    x, b = torch.randn(2, 3, 13), torch.randn(8)
    return {
        "float64 x": (x.double(), v.double(), c, o, None),
        "values dtype": (x, v.bfloat16(), c, o, b),
        "scalar x": (x[0, 0, 0], v, c, o, b),
        "R 2": (x, v.repeat(1, 2), c, o, b),
        "int64 columns": (x, v, c.long(), o, b),
        "columns shape": (x, v, c[1:], o, b),
        "int64 row_offsets": (x, v, c, o.long(), b),
        "empty row_offsets": (x, v, c, o[:0], b),
        "bias shape": (x, v, c, o, b[:5]),
        "bias dtype": (x, v, c, o, b.half()),
        "strided values": (x, torch.cat([v, v], 1)[:, :1], c, o, b),
    }


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("case", list(argument_errors()))
def test_argument_errors_match_the_cpu_op(device, case):
    args = argument_errors()[case]
    with cpu_kernels(), pytest.raises(RuntimeError) as cpu_error:
        ops.sparse_linear(*args)
    message = str(cpu_error.value).splitlines()[0]
    with pytest.raises(RuntimeError) as error:
        ops.sparse_linear(*on(device, *args))
    assert str(error.value).splitlines()[0] == message


def corrupt_packs():
    """Index arrays that pass the shape checks but break the format (the CPU op checks them on
    every call; the CUDA kernel asserts on the device, as ATen's indexing kernels do)."""
    v, c, o, _ = pack_sparse(weight(8, 13, 0.5, 1, 7, torch.float32))
    cases = {}
    for name, index, value in [("column past in_features", 0, 13), ("negative column", -1, -1)]:
        cols = c.clone()
        cols[index] = value
        cases[name] = (v, cols, o)
    for name, edit in [("offsets past nblocks", lambda t: t.__setitem__(-1, t[-1] + 1)),
                       ("last offset short of nblocks", lambda t: t.__setitem__(-1, t[-1] - 1)),
                       ("first offset not 0", lambda t: t.__setitem__(0, 1)),
                       ("decreasing offsets", lambda t: t.__setitem__(3, t[2] - 1))]:
        offsets = o.clone()
        edit(offsets)
        cases[name] = (v, c, offsets)
    return cases


@pytest.mark.parametrize("device", [d for d in cuda_devices() if is_emulated(d)])  # a GPU's context would not survive
@pytest.mark.parametrize("case", list(corrupt_packs()))
def test_corrupt_index_arrays_trip_a_device_assert(device, case):
    v, c, o = corrupt_packs()[case]
    x = torch.randn(5, 13)
    with cpu_kernels(), pytest.raises(RuntimeError, match="columns must lie in|row_offsets must"):
        ops.sparse_linear(x, v, c, o, None)
    with pytest.raises(RuntimeError, match=r"device-side assert CUDA_KERNEL_ASSERT\(.*\) failed at csrc/sparse_linear.cu"):
        ops.sparse_linear(x, v, c, o, None)
