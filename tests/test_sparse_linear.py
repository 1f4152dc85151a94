"""sparse_linear and its packed format against a dense float64 reference."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsebert.ops import SparseWeight, block_rows_of, pack_mask, pack_sparse, sparse_linear, unpack_sparse
from conftest import ROOT, devices, requires_cuda

ops = torch.ops.sparsebert

# (leading shape of x, in_features, out_features): tails of the 16-token vector, the 64-token tile,
# the 16-row output block and the 16-feature transpose, in every combination that matters.
SHAPES = [
    ((5,), 16, 16),
    ((1,), 7, 12),
    ((), 9, 4),
    ((2, 3), 13, 8),
    ((17,), 33, 20),
    ((64,), 64, 64),
    ((3, 43), 70, 68),  # 129 tokens: three tiles, the last of one token
    ((200,), 97, 36),
    ((2, 2, 2), 24, 4),
]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tolerances(dtype):
    # float32 accumulation in both; the 16-bit outputs are rounded once.
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)


def make_weight(n_out, n_in, sparsity, block_rows=1, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    keep = torch.rand(n_out // block_rows, 1, n_in, generator=g) >= sparsity
    keep = keep.expand(n_out // block_rows, block_rows, n_in).reshape(n_out, n_in)
    return torch.where(keep, w, 0.0).to(device, dtype), keep.to(device)


def make_x(lead, n_in, seed=1, dtype=torch.float32, device="cpu"):
    return torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def reference(x, w, b=None):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def run(x, packed, b=None):
    return sparse_linear(x, packed.values, packed.columns, packed.row_offsets, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
@pytest.mark.parametrize("block_rows", [1, 4])
def test_matches_dense_reference(device, dtype, lead, n_in, n_out, block_rows):
    for i, sparsity in enumerate(SPARSITIES):
        w, _ = make_weight(n_out, n_in, sparsity, block_rows, seed=i, dtype=dtype, device=device)
        b = torch.randn(n_out).to(device, dtype)
        x = make_x(lead, n_in, dtype=dtype, device=device)
        packed = pack_sparse(w, block_rows=block_rows)
        assert packed.block_rows == block_rows and packed.values.dtype == dtype
        for bias in (b, None):
            y = run(x, packed, bias)
            assert y.shape == (*lead, n_out) and y.dtype == dtype
            torch.testing.assert_close(y.double(), reference(x, w, bias), **tolerances(dtype),
                                       msg=lambda m: f"sparsity {sparsity}: {m}")


@pytest.mark.parametrize("device", devices())
def test_rows_without_nonzeros_get_the_bias(device):
    w, _ = make_weight(40, 50, 0.5, device=device)
    w[3:21] = 0  # an output block of 16 rows and its neighbours empty
    w[-1] = 0
    b = torch.randn(40, device=device)
    x = make_x((70,), 50, device=device)
    y = run(x, pack_sparse(w), b)
    torch.testing.assert_close(y.double(), reference(x, w, b), rtol=1e-4, atol=1e-4)
    assert torch.equal(y[:, 3:21], b[3:21].expand(70, 18))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["transposed", "strided rows", "sliced features", "expanded"])
def test_non_contiguous_x(device, layout):
    w, _ = make_weight(24, 40, 0.8, device=device)
    packed = pack_sparse(w)
    base = make_x((3, 80), 90, device=device)
    x = {
        "transposed": base[0, :40, :].t(),
        "strided rows": base[:, ::3, :40],
        "sliced features": base[1, :, 7:47],
        "expanded": base[0, :1, :40].expand(65, 40),
    }[layout]
    assert not x.is_contiguous()
    torch.testing.assert_close(run(x, packed).double(), reference(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_rows", [1, 4])
def test_threads_give_bitwise_identical_results(block_rows):
    # Every output is summed by one task in one order, whichever thread takes it.
    w, _ = make_weight(300, 70, 0.8, block_rows)
    x, b = make_x((150,), 70), torch.randn(300)
    packed = pack_sparse(w)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(x, packed, b))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    torch.testing.assert_close(results[0].double(), reference(x, w, b), rtol=1e-4, atol=1e-4)


def test_int32_columns_for_wide_inputs():
    w, _ = make_weight(8, 40000, 0.999)
    packed = pack_sparse(w)
    assert packed.columns.dtype == torch.int32
    x = make_x((3,), 40000)
    torch.testing.assert_close(run(x, packed).double(), reference(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("lead,n_in,n_out", [((0,), 8, 4), ((3,), 8, 0), ((3,), 0, 4)])
def test_empty_dimensions(device, lead, n_in, n_out):
    w = torch.zeros(n_out, n_in, device=device)
    b = torch.randn(n_out, device=device)
    x = make_x(lead, n_in, device=device)
    y = run(x, pack_sparse(w), b)
    assert y.shape == (*lead, n_out)
    torch.testing.assert_close(y, b.expand_as(y))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_portable_path_matches(capability):
    # torch's CPU capability picks the kernel once per process, so the portable path runs in a child.
    script = (
        "import torch, sparsebert, test_sparse_linear as t\n"
        "assert torch.backends.cpu.get_cpu_capability() == %r\n"
        "for dtype in t.DTYPES:\n"
        "    for lead, n_in, n_out in t.SHAPES:\n"
        "        for r in (1, 4):\n"
        "            w, _ = t.make_weight(n_out, n_in, 0.7, r, dtype=dtype)\n"
        "            x, b = t.make_x(lead, n_in, dtype=dtype), torch.randn(n_out).to(dtype)\n"
        "            y = t.run(x, t.pack_sparse(w, block_rows=r), b)\n"
        "            torch.testing.assert_close(y.double(), t.reference(x, w, b), **t.tolerances(dtype))\n"
        "print('ok')\n"
    ) % capability.upper()
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT / "tests", capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# The packed format


@pytest.mark.parametrize("block_rows", [1, 4])
def test_pack_unpack_round_trip(block_rows):
    w, keep = make_weight(36, 29, 0.7, block_rows)
    packed = pack_sparse(w, pack_mask(keep))
    assert block_rows_of(keep) == block_rows == packed.block_rows
    assert (packed.out_features, packed.in_features) == (36, 29)
    assert packed.values.shape == (int(keep.sum()) // block_rows, block_rows)
    assert packed.columns.dtype == torch.int16 and packed.row_offsets.dtype == torch.int32
    assert torch.equal(unpack_sparse(packed), w)


def test_pack_uses_the_mask_not_the_values():
    w, keep = make_weight(8, 16, 0.5)
    w_full = torch.where(keep, w, 7.0)  # pruned positions hold junk that the mask removes
    w_full[0, keep[0].nonzero()[0]] = 0.0  # a kept zero stays a stored zero
    packed = pack_sparse(w_full, pack_mask(keep))
    assert packed.values.shape[0] == int(keep.sum())
    assert torch.equal(unpack_sparse(packed), torch.where(keep, w_full, 0.0))


def test_pack_errors():
    w, keep = make_weight(8, 16, 0.5)
    with pytest.raises(ValueError, match="mask/weight mismatch"):
        pack_sparse(w, pack_mask(keep[:, :8]))
    with pytest.raises(ValueError, match="mask/weight mismatch"):
        pack_sparse(w, keep)
    with pytest.raises(ValueError, match="block_rows must be one of"):
        pack_sparse(w, block_rows=2)
    with pytest.raises(ValueError, match="does not divide"):
        pack_sparse(w[:6], block_rows=4)
    with pytest.raises(ValueError, match="must be 2-D"):
        pack_sparse(w[0])


# ---------------------------------------------------------------------------------------
# opcheck, torch.compile


def opcheck_samples():
    w, _ = make_weight(20, 33, 0.8)
    w4, _ = make_weight(20, 33, 0.8, block_rows=4)
    x = make_x((3, 5), 33)
    b = torch.randn(20)
    return [(x, *pack_sparse(w)[:3], b), (x[0], *pack_sparse(w4)[:3], None),
            (x.bfloat16(), *pack_sparse(w.bfloat16())[:3], b.bfloat16())]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("index", range(3))
def test_opcheck(device, index):
    sample = [None if t is None else t.to(device) for t in opcheck_samples()[index]]
    torch.library.opcheck(ops.sparse_linear.default, sample)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    w, _ = make_weight(20, 33, 0.8)
    packed = pack_sparse(w)
    b = torch.randn(20)

    def fn(x):
        return torch.relu(run(x, packed, b)).sum(-1)

    x = make_x((3, 5), 33)
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=True)
    torch.testing.assert_close(compiled(x), fn(x))
    torch.testing.assert_close(compiled(x[:, :2]), fn(x[:, :2]))
    explain = torch._dynamo.explain(fn)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


# ---------------------------------------------------------------------------------------
# Errors: raised before any work


def error_cases():
    w, _ = make_weight(8, 13, 0.5)
    v, c, o, _ = pack_sparse(w)
    x, b = make_x((2, 3), 13), torch.randn(8)
    bad_cols = c.clone()
    bad_cols[0] = 13
    neg_cols = c.clone()
    neg_cols[-1] = -1
    bad_offsets = o.clone()
    bad_offsets[-1] += 1
    unsorted = o.clone()
    unsorted[2], unsorted[3] = o[3], o[2] - 1
    return [
        (lambda: ops.sparse_linear(x.double(), v.double(), c, o, None), "x must be float32, bfloat16 or float16"),
        (lambda: ops.sparse_linear(x, v.bfloat16(), c, o, b), "values have dtype"),
        (lambda: ops.sparse_linear(x[0, 0, 0], v, c, o, b), "at least one dimension"),
        (lambda: ops.sparse_linear(x, v.repeat(1, 2), c, o, b), r"R \(rows per block\) 1 or 4"),
        (lambda: ops.sparse_linear(x, v, c.long(), o, b), "columns must be int16 or int32"),
        (lambda: ops.sparse_linear(x, v, c[1:], o, b), "columns must have shape"),
        (lambda: ops.sparse_linear(x, v, c, o.long(), b), "row_offsets must be int32"),
        (lambda: ops.sparse_linear(x, v, c, o[:0], b), "row_offsets must have shape"),
        (lambda: ops.sparse_linear(x, v, c, o, b[:5]), r"bias must have shape \[8\]"),
        (lambda: ops.sparse_linear(x, v, c, o, b.half()), "bias is Half"),
        (lambda: ops.sparse_linear(x, torch.cat([v, v], 1)[:, :1], c, o, b), "values must be contiguous"),
        (lambda: ops.sparse_linear(x, v, bad_cols, o, b), r"columns must lie in \[0, in_features = 13\)"),
        (lambda: ops.sparse_linear(x, v, neg_cols, o, b), r"columns must lie in \[0, in_features = 13\)"),
        (lambda: ops.sparse_linear(x[..., :12], v, c, o, b), r"columns must lie in \[0, in_features = 12\)"),
        (lambda: ops.sparse_linear(x, v, c, bad_offsets, b), "row_offsets must run from 0 to nblocks"),
        (lambda: ops.sparse_linear(x, v, c, unsorted, b), "row_offsets must be nondecreasing"),
    ]


@pytest.mark.parametrize("index", range(16))
def test_errors(index):
    call, match = error_cases()[index]
    with pytest.raises(RuntimeError, match=match):
        call()


@requires_cuda
def test_cuda_device_mismatch_raises():
    w, _ = make_weight(8, 13, 0.5, device="cuda")
    v, c, o, _ = pack_sparse(w)
    x = make_x((4,), 13, device="cuda")
    with pytest.raises(RuntimeError, match="values is on"):
        ops.sparse_linear(x, v.cpu(), c, o, None)
    with pytest.raises(RuntimeError, match="bias is"):
        ops.sparse_linear(x, v, c, o, torch.zeros(8))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r", [(4096, 768, 3072, 1), (300, 3072, 768, 4), (1, 7, 4, 1), (129, 65, 260, 4)])
def test_cuda_large_shapes(dtype, m, k, n, r):
    w, _ = make_weight(n, k, 0.9, r, dtype=dtype, device="cuda")
    x, b = make_x((m,), k, dtype=dtype, device="cuda"), torch.randn(n, device="cuda", dtype=dtype)
    y = run(x, pack_sparse(w), b)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.double(), reference(x, w, b), **tol)


def test_sparse_weight_bytes():
    w, _ = make_weight(64, 64, 0.9)
    packed = pack_sparse(w)
    assert isinstance(packed, SparseWeight)
    nnz = int((w != 0).sum())
    assert packed.nbytes() == nnz * 4 + nnz * 2 + 65 * 4
