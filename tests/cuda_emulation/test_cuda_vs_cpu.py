"""The CUDA kernels against the CPU ops as the oracle, at the launch geometries the op tests do not
reach: rows wider than a block's threads, several tiles for every top-k pass and both histogram
paths, ties spread over tiles, optimizer state in 16-bit floats over several chunks.

Runs on a GPU when there is one, and on the emulation harness under every schedule.
"""
import pytest
import torch

from conftest import cpu_kernels, cuda_devices
from sparsebert.ops import pack_mask

ops = torch.ops.sparsebert
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def on_cpu(a):
    if isinstance(a, list):
        return [on_cpu(t) for t in a]
    return a.cpu() if torch.is_tensor(a) else a


def oracle(fn, *args):
    """fn with the CPU kernels, on args moved to the CPU (CPU tensors are used as they are, so an
    in-place op updates them)."""
    with cpu_kernels():
        return fn(*on_cpu(list(args)))


def tie_heavy(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-3, 4, s, generator=g).float() * 0.5 for s in shapes]


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 5, 2500])  # rows of one byte, of part of a byte, of ~1.2 bytes a thread
def test_rows_kernel_widths(device, dtype, cols):
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(cols)).to(dtype)
    for k in sorted({1, (cols + 1) // 2, cols}):
        for use_abs in (True, False):
            got = ops.topk_mask_rows(x.to(device), k, use_abs)
            assert torch.equal(got.cpu(), oracle(ops.topk_mask_rows, x, k, use_abs))


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("digits", [(0, 8), (0, 12), (12, 4), (0, 13), (16, 16)], ids=str)
def test_histogram_paths_over_several_tiles(device, digits):
    """digit_bits <= 12 counts in shared memory per block, wider digits in global memory."""
    prefix_bits, digit_bits = digits
    xs = tie_heavy([(129, 200), (9000,)], seed=1) + [torch.randn(700, 30)]  # 7 tiles
    # The prefix of the largest key: the key of |x| is its float32 bits with the top bit set.
    top_key = max(int(x.abs().max().float().view(torch.int32)) | 0x80000000 for x in xs)
    prefix = top_key >> (32 - prefix_bits) if prefix_bits else 0
    got = ops.topk_histogram([x.to(device) for x in xs], True, prefix, prefix_bits, digit_bits)
    assert torch.equal(got.cpu(), oracle(ops.topk_histogram, xs, True, prefix, prefix_bits, digit_bits))
    assert int(got.sum()) > 0


@pytest.mark.parametrize("device", cuda_devices())
def test_ties_ranked_across_tiles(device):
    """Masks from a threshold whose ties to keep start in one tile and end several tiles later."""
    xs = tie_heavy([(300, 130), (5,), (200, 41)], seed=2)
    key = int(oracle(ops.topk_mask, xs, 20000, True)[1].view(torch.int32)) | 0x80000000
    for ties in (0, 1, 9000, 10**9):
        got = ops.topk_mask_from_threshold([x.to(device) for x in xs], True, key, ties)
        want = oracle(ops.topk_mask_from_threshold, xs, True, key, ties)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
def test_adamw_16_bit_state_over_several_chunks(device, dtype, compact):
    """16-bit params with 16-bit state (the CPU op takes neither): the kernel computes in float32
    and rounds once per stored value, so it matches float32 math on the rounded inputs."""
    g = torch.Generator().manual_seed(3)
    shapes = [(200, 130), (77,)]  # 26000 elements: two chunks
    keep = torch.rand(shapes[0], generator=g) < 0.3
    params = [(torch.randn(s, generator=g) * (keep if i == 0 else 1)).to(dtype) for i, s in enumerate(shapes)]
    masks = [pack_mask(keep), None]
    n = int(keep.sum())
    sizes = [(n,) if compact else shapes[0], shapes[1]]
    state = lambda t: [torch.rand(s, generator=g).to(t) for s in sizes]  # noqa: E731
    m, v = state(dtype), state(dtype)
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    ref_p, ref_m, ref_v = [p.float() for p in params], [t.float() for t in m], [t.float() for t in v]
    oracle(ops.masked_adamw_, ref_p, [x.float() for x in grads], ref_m, ref_v, masks, 3, 1e-2, 0.9, 0.999, 1e-8, 0.1,
           False, compact, True)
    on = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    p_d, m_d, v_d = on(params), on(m), on(v)
    ops.masked_adamw_(p_d, on(grads), m_d, v_d, [mk.to(device) if mk is not None else None for mk in masks], 3, 1e-2,
                      0.9, 0.999, 1e-8, 0.1, False, compact, True)
    for got, want in zip(p_d + m_d + v_d, ref_p + ref_m + ref_v):
        torch.testing.assert_close(got.cpu(), want.to(dtype))


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_linear_many_k_tiles(device, dtype):
    """K = 200: thirteen k-tiles, the last one partial, through the wmma (16-bit) or SIMT path."""
    g = torch.Generator().manual_seed(4)
    x, w, go = torch.randn(70, 200, generator=g), torch.randn(65, 200, generator=g), torch.randn(70, 65, generator=g)
    mask = pack_mask(torch.rand(65, 200, generator=g) < 0.2)
    x, w, go = x.to(dtype), w.to(dtype), go.to(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=5e-2)
    # The CPU op computes 16-bit products in float32 too (or takes no fp16): compare in float32.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    y = ops.masked_linear(x.to(device), w.to(device), mask.to(device), None, False)
    torch.testing.assert_close(y.cpu().to(wide), oracle(ops.masked_linear, x.to(wide), w.to(wide), mask, None, False),
                               **tol)
    gx = ops.masked_linear_grad_input(go.to(device), w.to(device), mask.to(device), False)
    torch.testing.assert_close(gx.cpu().to(wide), oracle(ops.masked_linear_grad_input, go.to(wide), w.to(wide), mask,
                                                         False), **tol)
