"""Top-k mask ops against a pure-PyTorch oracle: stable sorts of order-preserving keys."""
import math
import threading

import pytest
import torch

from conftest import devices, kept_oracle
from sparsebert.ops import pack_mask, unpack_mask
from sparsebert.ops import select as S
from sparsebert.ops import topk as T

ops = torch.ops.sparsebert


# --- reference -------------------------------------------------------------------------


def ref_keys(x: torch.Tensor, use_abs: bool) -> torch.Tensor:
    """The uint32 keys as int64: bits ^ (sign ? 0xFFFFFFFF : 0x80000000) of float32(x) (|x|)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if use_abs:
        bits = bits & 0x7FFFFFFF
    return torch.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)


def keep_top(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest keys along the last dim; stable sort, so lower index wins ties."""
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(keys, dtype=torch.bool)
    return keep.scatter(-1, order[..., :k], True)


def ref_global(xs, k, use_abs=True):
    keys = torch.cat([ref_keys(x, use_abs).flatten().cpu() for x in xs])
    flat = keep_top(keys, k)
    return [part.reshape(x.shape) for part, x in zip(flat.split([x.numel() for x in xs]), xs)]


def ref_rows(x, k, use_abs=True):
    return keep_top(ref_keys(x, use_abs).cpu(), k)


def ref_nm(x, n, m, use_abs=True):
    keys = ref_keys(x, use_abs).cpu()
    return keep_top(keys.reshape(*x.shape[:-1], -1, m), n).reshape(x.shape)


def ref_block_scores(x, block, norm):
    """Block scores by explicit loops over 2-D blocks (an independent route from the reshape)."""
    x2 = x.float().cpu().reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.float().cpu().reshape(1, -1)
    rows = x.shape[-2] if x.dim() >= 2 else 1
    br, bc = block
    mats = x2.reshape(-1, rows, x2.shape[-1])
    out = torch.empty(mats.shape[0], rows // br, x2.shape[-1] // bc)
    for b in range(mats.shape[0]):
        for i in range(rows // br):
            for j in range(x2.shape[-1] // bc):
                blk = mats[b, i * br:(i + 1) * br, j * bc:(j + 1) * bc]
                out[b, i, j] = blk.abs().sum() if norm == "l1" else blk.square().sum().sqrt()
    return out


def ref_block(xs, k, block, norm):
    scores = [ref_block_scores(x, block, norm) for x in xs]
    keeps = ref_global(scores, k)
    out = []
    for keep, x in zip(keeps, xs):
        full = keep.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
        out.append(full.reshape(x.shape))
    return out


def unpack(masks, xs):
    return [unpack_mask(mk, x.shape[-1]).cpu() for mk, x in zip(masks, xs)]


def assert_masks(got, want, xs):
    for g, w, x in zip(got, want, xs):
        assert g.dtype == torch.uint8 and g.shape == (*x.shape[:-1], (x.shape[-1] + 7) // 8)
        assert torch.equal(unpack_mask(g, x.shape[-1]).cpu(), w), "mask differs from the reference"
        assert torch.equal(g.cpu(), pack_mask(w)), "padding bits must be zero"


def kept(masks, xs):
    return sum(int(m.sum()) for m in unpack(masks, xs))


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPE_LISTS = [
    [(37,)],
    [(5, 13)],
    [(3, 4, 19), (64, 8), (11,)],
    [(7, 3), (1, 1), (300,), (2, 2, 2)],
]


def make(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]


# --- hand-checked golden cases ---------------------------------------------------------

X = [[1.0, -8.0, 3.0, 0.0],
     [2.0, 2.0, -2.0, 7.0],
     [-4.0, 5.0, 0.5, 6.0],
     [0.0, -1.0, 9.0, -3.0]]


def bits(rows):
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("device", devices())
def test_golden_4x4(device):
    x = torch.tensor(X, device=device)
    # |X| sorted: 9 8 7 6 5 4 3 3 2 2 2 1 1 .5 0 0
    cases = [
        (dict(sparsity=0.625), [[0, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0]], 4.0),  # keep 6
        (dict(k=7), [[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0]], 3.0),  # first of the two 3s
        (dict(k=10), [[0, 1, 1, 0], [1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 1]], 2.0),  # first two of three 2s
    ]
    for kw, want, threshold in cases:
        masks, t = S.topk_masks([x], **kw)
        assert_masks(masks, [bits(want)], [x])
        assert float(t) == threshold
    masks, t = S.topk_masks([x], k=3, use_abs=False)  # signed: 9 7 6
    assert_masks(masks, [bits([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 0]])], [x])
    assert float(t) == 6.0

    masks, t = S.topk_masks([x], sparsity=0.5, scope="tensor")
    assert_masks(masks, [bits([[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 1], [0, 0, 1, 1]])], [x])
    assert t.tolist() == [3.0]

    row_want = bits([[0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]])
    masks, t = S.topk_masks([x], sparsity=0.5, scope="row")
    assert_masks(masks, [row_want], [x])
    assert t.tolist() == [2.0]
    masks, _ = S.topk_masks([x], scope="nm", n=2, m=4)
    assert_masks(masks, [row_want], [x])
    masks, _ = S.topk_masks([x], scope="nm", n=1, m=2)
    assert_masks(masks, [bits([[0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 0]])], [x])

    # 2x2 blocks, L1: 13, 12 / 10, 18.5
    for norm in ("l1", "l2"):
        masks, t = S.topk_masks([x], sparsity=0.5, scope="block", block=(2, 2), block_norm=norm)
        assert_masks(masks, [bits([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])], [x])
    masks, t = S.topk_masks([x], k=2, scope="block", block=(2, 2))
    assert float(t) == 13.0


# --- random inputs against the reference ------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS, ids=str)
@pytest.mark.parametrize("use_abs", [True, False])
def test_global_and_tensor_match_reference(device, dtype, shapes, use_abs):
    xs = make(shapes, dtype, device)
    n = sum(x.numel() for x in xs)
    for sparsity in (0.0, 0.3, 0.9):
        k = kept_oracle(n, sparsity)
        masks, t = S.topk_masks(xs, sparsity=sparsity, use_abs=use_abs)
        assert kept(masks, xs) == k
        assert_masks(masks, ref_global(xs, k, use_abs), xs)
        scores = torch.cat([(x.abs() if use_abs else x).float().flatten().cpu() for x in xs])
        assert float(t) == float(scores.sort(descending=True).values[k - 1])

        masks, t = S.topk_masks(xs, sparsity=sparsity, scope="tensor", use_abs=use_abs)
        want = [ref_global([x], kept_oracle(x.numel(), sparsity), use_abs)[0] for x in xs]
        assert_masks(masks, want, xs)
        assert t.shape == (len(xs),)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 13), (3, 4, 19), (37,), (8, 1)], ids=str)
def test_rows_match_reference(device, dtype, shape):
    x = make([shape], dtype, device)[0]
    for sparsity in (0.0, 0.5, 0.95):
        k = kept_oracle(shape[-1], sparsity)
        masks, _ = S.topk_masks([x], sparsity=sparsity, scope="row")
        assert_masks(masks, [ref_rows(x, k)], [x])
        assert torch.all(unpack(masks, [x])[0].sum(-1) == k)
    for use_abs in (True, False):
        assert_masks([T.topk_mask_rows(x, 3 if shape[-1] >= 3 else 1, use_abs)], [ref_rows(x, 3 if shape[-1] >= 3 else 1, use_abs)], [x])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n,m", [((6, 12), 2, 4), ((3, 2, 20), 2, 4), ((40,), 1, 4), ((5, 24), 3, 8), ((4, 6), 1, 3)], ids=str)
def test_nm_match_reference_and_is_valid(device, dtype, shape, n, m):
    x = make([shape], dtype, device)[0]
    for use_abs in (True, False):
        mask = T.nm_mask(x, n, m, use_abs)
        want = ref_nm(x, n, m, use_abs)
        assert_masks([mask], [want], [x])
        groups = unpack([mask], [x])[0].reshape(-1, m)
        assert torch.all(groups.sum(-1) == n)
    masks, _ = S.topk_masks([x], scope="nm", n=n, m=m, sparsity=1 - n / m)
    assert_masks(masks, [ref_nm(x, n, m)], [x])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("block", [(1, 4), (2, 2), (4, 1)], ids=str)
def test_block_matches_reference(device, norm, block):
    g = torch.Generator().manual_seed(3)
    # Small integers: block sums are exact whatever the summation order, and ties are common.
    xs = [torch.randint(-4, 5, s, generator=g).float().to(device) for s in [(8, 12), (4, 8), (2, 4, 4)]]
    nblocks = sum(x.numel() for x in xs) // (block[0] * block[1])
    for sparsity in (0.0, 0.5, 0.75):
        k = kept_oracle(nblocks, sparsity)
        masks, _ = S.topk_masks(xs, sparsity=sparsity, scope="block", block=block, block_norm=norm)
        assert_masks(masks, ref_block(xs, k, block, norm), xs)
        assert kept(masks, xs) == k * block[0] * block[1]


# --- ties, determinism, edge k ----------------------------------------------------------


def tie_heavy(device, shapes=((300, 700), (129, 515), (70001,)), seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for s in shapes:
        x = torch.randint(-3, 4, s, generator=g).float()  # values in {-3..3}: ~1/7 exact zeros, all ties
        x[torch.rand(s, generator=g) < 0.3] = 0.0
        xs.append(x.to(device))
    return xs


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "shapes",
    [
        # Every |value| bucket holds > 2**16 elements: the CPU's two-histogram path.
        ((300, 700), (129, 515), (70001,)),
        # Buckets small enough for the CPU's one-histogram path that buffers the undecided bucket.
        ((300, 200), (129, 51)),
    ],
    ids=["crowded-buckets", "small-buckets"],
)
def test_ties_deterministic_and_thread_independent(device, shapes):
    xs = tie_heavy(device, shapes)  # > 2**16 elements: several segments / blocks
    n = sum(x.numel() for x in xs)
    threads = torch.get_num_threads()
    try:
        for k in (1, n // 10, n // 2, n - 5):  # thresholds at 3, 2 or 1, and inside the zeros
            torch.set_num_threads(2)
            a, ta = T.topk_mask(xs, k)
            b, tb = T.topk_mask(xs, k)
            torch.set_num_threads(1)
            c, tc = T.topk_mask(xs, k)
            for ma, mb, mc in zip(a, b, c):
                assert torch.equal(ma, mb) and torch.equal(ma, mc)
            assert float(ta) == float(tb) == float(tc)
            assert_masks(a, ref_global(xs, k), xs)
            assert kept(a, xs) == k
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", devices())
def test_ties_rows_and_nm(device):
    xs = tie_heavy(device, shapes=((50, 96),))
    x = xs[0]
    for k in (0, 1, 10, 48, 96):
        assert_masks([T.topk_mask_rows(x, k, True)], [ref_rows(x, k)], [x])
    assert_masks([T.nm_mask(x, 2, 4, True)], [ref_nm(x, 2, 4)], [x])
    zeros = torch.zeros(3, 16, device=device)
    assert_masks([T.nm_mask(zeros, 2, 4, True)], [ref_nm(zeros, 2, 4)], [zeros])  # the first two of each group


@pytest.mark.parametrize("device", devices())
def test_k_zero_and_all(device):
    xs = make([(5, 13), (7,)], torch.float32, device)
    n = sum(x.numel() for x in xs)
    masks, t = T.topk_mask(xs, 0)
    assert kept(masks, xs) == 0 and float(t) == math.inf and t.dim() == 0 and t.dtype == torch.float32
    masks, t = T.topk_mask(xs, n)
    assert_masks(masks, [torch.ones(x.shape, dtype=torch.bool) for x in xs], xs)
    assert float(t) == float(torch.cat([x.abs().flatten() for x in xs]).min())
    masks, t = S.topk_masks(xs, sparsity=0.0)
    assert kept(masks, xs) == n
    assert T.topk_mask_rows(xs[0], 0, True).sum() == 0


@pytest.mark.parametrize("device", devices())
def test_empty_tensor_in_list(device):
    xs = [torch.randn(3, 5, device=device), torch.empty(0, 4, device=device), torch.randn(9, device=device)]
    masks, _ = T.topk_mask(xs, 7)
    assert masks[1].shape == (0, 1)
    want = ref_global(xs, 7)
    # unpack_mask cannot reshape a mask with no rows, so the empty one is only shape-checked.
    assert_masks([masks[0], masks[2]], [want[0], want[2]], [xs[0], xs[2]])


# --- the exposed radix-select steps -----------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("use_abs", [True, False])
def test_histogram_matches_bincount(device, use_abs):
    xs = make([(40, 33), (1000,)], torch.float32, device)
    keys = torch.cat([ref_keys(x, use_abs).flatten().cpu() for x in xs])
    for prefix_bits, digit_bits in ((0, 16), (0, 11), (11, 11), (16, 16), (22, 10), (8, 8)):
        top = keys.max() if prefix_bits else torch.tensor(0)
        prefix = int(top >> (32 - prefix_bits)) if prefix_bits else 0
        sel = keys[(keys >> (32 - prefix_bits)) == prefix] if prefix_bits else keys
        digits = (sel >> (32 - prefix_bits - digit_bits)) & ((1 << digit_bits) - 1)
        want = torch.bincount(digits, minlength=1 << digit_bits)
        got = T.topk_histogram(xs, use_abs, prefix, prefix_bits, digit_bits)
        assert got.dtype == torch.int64 and got.device.type == torch.device(device).type
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", devices())
def test_mask_from_threshold(device):
    xs = tie_heavy(device, shapes=((30, 21), (17,)))
    keys = torch.cat([ref_keys(x, True).flatten().cpu() for x in xs])
    key = int(ref_keys(torch.tensor(2.0), True))
    for ties in (0, 1, 5, 10**9):
        want = (keys > key) | ((keys == key) & ((keys == key).cumsum(0) <= ties))
        got = torch.cat([m.flatten() for m in unpack(T.topk_mask_from_threshold(xs, True, key, ties), xs)])
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("schedule", [None, (11, 11, 10), (8, 8, 8, 8)], ids=str)
def test_find_threshold_single_process(device, schedule, monkeypatch):
    if schedule is not None:  # the digit schedules of the other device, on this one
        monkeypatch.setattr(T, "_digit_schedule", lambda _device: schedule)
    xs = tie_heavy(device, shapes=((64, 100), (37,)))
    n = sum(x.numel() for x in xs)
    for k in (0, 1, 777, n // 2, n):
        key, ties = T.find_threshold(xs, k)
        assert_masks(T.topk_mask_from_threshold(xs, True, key, ties), ref_global(xs, k), xs)
        if k:
            masks, t = T.topk_mask(xs, k)
            assert T.key_to_value(key) == float(t)


def run_ranks(shards, fn):
    """Runs fn(rank, shard, all_reduce, all_gather) on one thread per rank with collective fakes."""
    world = len(shards)
    barrier = threading.Barrier(world)
    slots = [None] * world
    results = [None] * world

    def gather(rank, t):
        slots[rank] = t.clone()
        barrier.wait()
        out = torch.stack(slots)
        barrier.wait()
        return out

    def work(rank):
        all_reduce = lambda t: t.copy_(gather(rank, t).sum(0))  # in place, like torch.distributed  # noqa: E731
        results[rank] = fn(rank, shards[rank], all_reduce, lambda t: gather(rank, t))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


@pytest.mark.parametrize("device", devices())
def test_find_threshold_sharded_two_ranks(device):
    xs = tie_heavy(device, shapes=((64, 100), (37,), (20, 20), (5, 9)))
    n = sum(x.numel() for x in xs)
    shards = [xs[:2], xs[2:]]  # rank 0 holds the first tensors in flat order
    for k in (1, 1000, n // 2, n - 1):
        def fn(rank, shard, all_reduce, all_gather):
            key, ties = T.find_threshold(shard, k, all_reduce=all_reduce, all_gather=all_gather, rank=rank)
            return T.topk_mask_from_threshold(shard, True, key, ties)
        per_rank = run_ranks(shards, fn)
        single, _ = T.topk_mask(xs, k)
        for got, want in zip(per_rank[0] + per_rank[1], single):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="needs all_gather"):
        T.find_threshold(xs, 1, all_reduce=lambda t: None)


# --- PyTorch integration ----------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    xs = make([(6, 10), (13,)], torch.float32, device)
    x = make([(6, 12)], torch.float32, device)[0]
    checks = [
        (ops.topk_histogram.default, (xs, True, 0, 0, 11)),
        (ops.topk_mask_from_threshold.default, (xs, True, int(ref_keys(torch.tensor(0.5), True)), 2)),
        (ops.topk_mask.default, (xs, 20, True)),
        (ops.topk_mask_rows.default, (x, 5, False)),
        (ops.nm_mask.default, (x, 2, 4, True)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    xs = make([(8, 16), (16,)], torch.float32, device)

    def fn(a, b):
        out = []
        for scope in ("global", "tensor", "row", "block"):
            out += S.topk_masks([a, b], sparsity=0.5, scope=scope)[0]
        out += S.topk_masks([a, b], scope="nm")[0]
        return out

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*xs), fn(*xs)):
        assert torch.equal(got, want)


# --- kept counts ------------------------------------------------------------------------


def test_kept_count_takes_decimal_sparsities_exactly():
    # 0.29 * 100 is 28.999... in binary floating point: a float floor would keep 72.
    assert T.kept_count(100, 0.29) == 71 and T.kept_count(100, 0.57) == 43 and T.kept_count(100, 0.58) == 42
    for count in (1, 7, 100, 768, 16384, 589824):
        for thousandths in range(1000):
            assert T.kept_count(count, thousandths / 1000) == count - thousandths * count // 1000
    assert T.kept_count(10, 0.0) == 10 and T.kept_count(10, 1.0) == 0
    with pytest.raises(ValueError, match="sparsity must be in"):
        T.kept_count(10, 1.5)


@pytest.mark.parametrize("scope", ["global", "tensor", "row", "block"])
def test_topk_masks_keep_the_decimal_count(scope):
    x = torch.randn(3, 100)
    masks, _ = S.topk_masks([x[:1].clone()] if scope != "row" else [x], sparsity=0.29, scope=scope, block=(1, 1))
    assert kept(masks, [x[:1]] if scope != "row" else [x]) == (71 if scope != "row" else 3 * 71)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_errors(device):
    x = torch.randn(4, 8, device=device)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[2, 3] = bad
        for call in (
            lambda: S.topk_masks([x, y], sparsity=0.5),
            lambda: S.topk_masks([y], sparsity=0.5, scope="row"),
            lambda: S.topk_masks([y], scope="nm"),
            lambda: T.topk_mask([y], 0),
            lambda: T.topk_histogram([y], True, 0, 0, 16),
            lambda: T.topk_mask_from_threshold([y], True, 0, 0),
        ):
            with pytest.raises(RuntimeError, match="NaN or \\+-Inf"):
                call()
    with pytest.raises(RuntimeError, match="NaN or \\+-Inf"):
        ops.topk_mask([torch.tensor([1e300], dtype=torch.float64, device=device)], 1, True)  # inf as float32
    for kw, match in (
        (dict(sparsity=-0.1), "sparsity must be in \\[0, 1\\)"),
        (dict(sparsity=1.0), "sparsity must be in \\[0, 1\\)"),
        (dict(k=33), "k must be in \\[0, N\\]"),
        (dict(k=-1), "k must be in \\[0, N\\]"),
        (dict(), "exactly one of k and sparsity"),
        (dict(k=1, sparsity=0.5), "exactly one of k and sparsity"),
        (dict(k=1, scope="bogus"), "scope must be one of"),
        (dict(scope="nm", n=5, m=4), "0 <= n <= m"),
        (dict(scope="nm", m=3), "divisible by m=3"),
        (dict(scope="nm", sparsity=0.6), "sparsity 0.5"),
        (dict(scope="nm", k=4), "not k"),
        (dict(k=1, scope="block", block=(3, 4)), "must divide"),
        (dict(k=1, scope="block", block=(2, 3)), "must divide"),
        (dict(k=1, scope="block", block_norm="l3"), "block_norm"),
        (dict(k=9, scope="row"), "k must be in \\[0, N\\]"),
    ):
        with pytest.raises(ValueError, match=match):
            S.topk_masks([x], **kw)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.topk_mask([x], 33, True)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.topk_mask([x], -1, True)
    with pytest.raises(RuntimeError, match="n must be in"):
        ops.nm_mask(x, 5, 4, True)
    with pytest.raises(RuntimeError, match="divisible by m"):
        ops.nm_mask(x, 1, 3, True)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.topk_mask_rows(x, 9, True)
    with pytest.raises(RuntimeError, match="digit_bits"):
        ops.topk_histogram([x], True, 0, 0, 17)
    with pytest.raises(RuntimeError, match="prefix must be in"):
        ops.topk_histogram([x], True, 1 << 16, 16, 16)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.topk_mask([x, x.double()], 1, True)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        ops.topk_mask([x.int()], 1, True)
    with pytest.raises(ValueError, match="must not be empty"):
        S.topk_masks([], k=0)
