"""The harness catches the deliberately broken kernels of mutants.py, and passes the real ones.

Each check runs one op of a library (the real kernels, or one mutant's) against the CPU op under
one schedule. A mutant counts as caught under a schedule when the check fails: a fault of the
harness, an error of the op, or a result that differs from the CPU op.
"""
import pytest
import torch

from cuda_emulation import build, harness
from cuda_emulation.mutants import MUTANTS
from sparsebert.ops import pack_mask, pack_sparse

cpu = torch.ops.sparsebert
SEED = 7


def check_topk_rows(ops):
    # 3000 columns: 375 mask bytes, so threads own one or two bytes each.
    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0))
    for k in (1, 700, 2999):
        assert torch.equal(ops.topk_mask_rows(x, k, True), cpu.topk_mask_rows(x, k, True))


def check_topk_global(ops):
    # 9000 + 77 mask bytes: the second tile is partly past the last byte.
    xs = [torch.randn(300, 240, generator=torch.Generator().manual_seed(1)), torch.randn(77, 8)]
    got, threshold = ops.topk_mask(xs, 5000, True)
    want, want_threshold = cpu.topk_mask(xs, 5000, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and float(threshold) == float(want_threshold)


def check_compact_adamw(ops):
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(64, 96, generator=g) < 0.5
    n = int(keep.sum())
    param, grad = torch.randn(64, 96, generator=g) * keep, torch.randn(64, 96, generator=g)
    results = []
    for op in (ops, cpu):
        p, m, v = param.clone(), torch.zeros(n), torch.zeros(n)
        op.masked_adamw_([p], [grad], [m], [v], [pack_mask(keep)], 1, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, True, True)
        results.append((p, m, v))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def check_simt_linear(ops):
    # 100 input features: seven 16-deep k-tiles; float32 takes the SIMT path.
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(70, 100, generator=g), torch.randn(65, 100, generator=g)
    mask = pack_mask(torch.rand(65, 100, generator=g) < 0.4)
    torch.testing.assert_close(ops.masked_linear(x, w, mask, None, False), cpu.masked_linear(x, w, mask, None, False))


def check_sparse_linear(ops):
    # 40 tokens x 70 outputs: two token tiles and three row tiles of 32, the last partial.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(70, 50, generator=g) * (torch.rand(70, 50, generator=g) < 0.3)
    values, columns, row_offsets, _ = pack_sparse(w)
    x = torch.randn(40, 50, generator=g)
    torch.testing.assert_close(ops.sparse_linear(x, values, columns, row_offsets, None),
                               cpu.sparse_linear(x, values, columns, row_offsets, None))


CHECKS = {
    "topk_rows_no_barrier": check_topk_rows,
    "optim_count_shuffle_from_8": check_compact_adamw,
    "linear_simt_no_trailing_barrier": check_simt_linear,
    "topk_mask_early_return": check_topk_global,
    "sparse_linear_no_tile_barrier": check_sparse_linear,
}


def outcome(library, schedule, check) -> str:
    library.set_schedule(schedule, SEED)
    try:
        check(library.ops)
    except AssertionError:
        return "wrong result"
    except RuntimeError as e:
        return "error: " + str(e).splitlines()[0]
    return "passed"


def test_every_mutant_has_a_check():
    assert set(CHECKS) == {m.name for m in MUTANTS}


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught_and_the_real_kernel_passes(mutant):
    check = CHECKS[mutant.name]
    real = {s: outcome(build.main_library(), s, check) for s in harness.SCHEDULES}
    assert all(o == "passed" for o in real.values()), real
    broken = {s: outcome(build.mutant_libraries()[mutant.name], s, check) for s in harness.SCHEDULES}
    print(f"{mutant.name}: {broken}")
    assert any(o != "passed" for o in broken.values()), f"{mutant.name} ({mutant.why}) went unnoticed"
