"""The CUDA emulation itself: schedules, CUDA semantics, stand-ins and the faults it reports.

The kernels are in kernels/selftest.cu (ops of namespace emu_selftest); the expected values are
computed here from the CUDA programming guide's definitions.
"""
import re

import pytest
import torch

from cuda_emulation import build, harness, rewrite

SCHEDULES = harness.SCHEDULES
S = None  # torch.ops.emu_selftest, once the library is loaded


@pytest.fixture(scope="module")
def lib():
    global S
    library = build.main_library()
    S = torch.ops.emu_selftest
    return library


def ints(*shape):
    return torch.zeros(shape, dtype=torch.int32)


def order(lib, schedule, blocks, threads, seed=0):
    lib.set_schedule(schedule, seed)
    out = ints(2, blocks, threads)
    S.order(out)
    return out


def test_forward_and_reverse_orders(lib):
    blocks, threads = 3, 40
    up = torch.arange(threads, dtype=torch.int32)
    # Blocks one after another; inside a block, threads in id order between barriers.
    fwd = order(lib, "forward", blocks, threads)
    for b in range(blocks):
        assert torch.equal(fwd[0, b], 2 * threads * b + up)
        assert torch.equal(fwd[1, b], 2 * threads * b + threads + up)
    rev = order(lib, "reverse", blocks, threads)
    for b in range(blocks):
        start = 2 * threads * (blocks - 1 - b)
        assert torch.equal(rev[0, b], start + up.flip(0))
        assert torch.equal(rev[1, b], start + threads + up.flip(0))


def test_random_order_is_a_seeded_permutation(lib):
    blocks, threads = 4, 64
    a = order(lib, "random", blocks, threads, seed=1)
    b = order(lib, "random", blocks, threads, seed=1)
    c = order(lib, "random", blocks, threads, seed=2)
    assert torch.equal(a, b), "a seed replays its schedule"
    assert not torch.equal(a, c)
    assert torch.equal(a.flatten().sort().values, torch.arange(2 * blocks * threads, dtype=torch.int32))
    for phase in range(2):
        assert not torch.equal(a[phase], order(lib, "forward", blocks, threads)[phase])
        assert not torch.equal(a[phase], order(lib, "reverse", blocks, threads)[phase])
    # Block order is shuffled too: the blocks' first entries are not in block order.
    firsts = a[0].min(dim=1).values
    assert not torch.equal(firsts, firsts.sort().values)


def test_shared_memory_starts_as_garbage_in_every_block(lib):
    outs = []
    for seed in (1, 2):
        lib.set_schedule("random", seed)
        out = ints(3, 2, 32)
        S.uninitialized_shared(out)
        outs.append(out)
    static, dynamic = outs[0][:, 0], outs[0][:, 1]
    for part in (static, dynamic):
        assert (part != 0).float().mean() > 0.9
        assert not torch.equal(part[0], part[1]), "each block gets new garbage"
    assert not torch.equal(outs[0], outs[1]), "the garbage depends on the seed"


def test_warp_votes_shuffles_and_block_reductions(lib):
    lib.set_schedule("random", 3)
    out = ints(64, 12)
    S.warp_ops(out)
    t = torch.arange(64)
    lane, warp_base = t % 32, t - t % 32
    v = 10 * t

    def from_lane(src, keep):
        return torch.where(keep, 10 * (warp_base + src), v)

    ballot = sum(1 << l for l in range(0, 32, 3))
    every = torch.ones(64, dtype=torch.bool)
    expected = torch.stack([
        torch.full((64,), ballot),
        from_lane(lane + 5, lane + 5 < 32),
        from_lane(lane - 3, lane >= 3),
        from_lane(lane ^ 7, every),
        from_lane(31 - lane, every),
        from_lane(lane + 2, (lane % 8) + 2 < 8),  # width 8: no reads across 8-lane segments
        torch.full((64,), 1),
        torch.full((64,), 0),
        torch.where(lane < 16, 10 * (warp_base + (lane ^ 1)), -1),
        torch.full((64,), 1),
        torch.full((64,), 22),  # threads 0, 3, ..., 63
        torch.full((64,), 1),
    ], dim=1).int()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cub_block_scan_and_reduce(lib, schedule):
    lib.set_schedule(schedule, 4)
    x = torch.randint(-1000, 1000, (512,), generator=torch.Generator().manual_seed(0))
    out = S.block_collectives(x)
    first = x[0::2]
    assert torch.equal(out[:, 0], first.cumsum(0) - first)
    assert torch.equal(out[:, 1:3], x.cumsum(0).view(256, 2))
    assert int(out[0, 3]) == int(first.sum())


def test_cub_storage_reuse_without_a_barrier_is_caught(lib):
    """cub's collectives end without a barrier: a second scan through the same TempStorage races
    with the slower warps of the first. Some schedule must expose it."""
    x = torch.randint(-100, 100, (256,), generator=torch.Generator().manual_seed(0))
    exclusive = x.cumsum(0) - x
    wrong = []
    for schedule in SCHEDULES:
        lib.set_schedule(schedule, 5)
        out = S.scan_storage_reuse(x)
        wrong.append(not (torch.equal(out[0], exclusive) and torch.equal(out[1], 2 * exclusive)))
    assert any(wrong)


def test_device_scan(lib):
    x = torch.randint(-50, 50, (1000,))
    assert torch.equal(S.device_scan(x), x.cumsum(0) - x)
    assert S.device_scan(torch.empty(0, dtype=torch.long)).numel() == 0


def test_wmma_product_and_its_alignment_rules(lib):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g).half(), torch.randn(16, 16, generator=g).half()
    want = a.float() @ b.float()
    torch.testing.assert_close(S.wmma_product(a.flatten(), b.t().contiguous(), 16, 0), want)
    # A inside a wider buffer: ldm 24 halves (48 bytes) is allowed, an offset of 16 halves too.
    buf = torch.zeros(16 + 16 * 24, dtype=torch.half)
    buf[16:].view(16, 24)[:, :16] = a
    torch.testing.assert_close(S.wmma_product(buf, b.t().contiguous(), 24, 16), want)
    with pytest.raises(RuntimeError, match="not 256-bit aligned"):
        S.wmma_product(buf, b.t().contiguous(), 24, 8)
    with pytest.raises(RuntimeError, match="ldm = 12 elements is not a multiple of 16 bytes"):
        S.wmma_product(buf, b.t().contiguous(), 12, 0)


FAULTS = {
    "exit_before_barrier": r"__syncthreads reached by only part of the block.*63 wait at __syncthreads at "
                           r"tests/cuda_emulation/kernels/selftest.cu:\d+.*1 have exited",
    "divergent_barrier": r"wait at different barriers.*32 wait at __syncthreads at .*selftest.cu:\d+.*"
                         r"32 wait at __syncthreads at .*selftest.cu:\d+",
    "exited_lane": r"(mask names lane 3, which has exited|exits while lane \d+ waits for it at __shfl_sync)",
    "deadlock": r"deadlock.*16 wait at __syncwarp at .*\(mask 0xffffffff\).*16 wait at __syncthreads",
    "lane_not_in_mask": r"__ballot_sync \(mask 0x00000001\): the calling lane \d+ is not in the mask",
    "shuffle_outside_mask": r"lane 1[2-5] shuffles from lane 1[6-9], which is not in the mask",
    "trap": r"thread \(7, 0, 0\) of block \(0, 0, 0\): __trap\(\) at tests/cuda_emulation/kernels/selftest.cu:\d+",
    "kernel_assert": r"thread \(11, 0, 0\) of block \(0, 0, 0\): device-side assert "
                     r"CUDA_KERNEL_ASSERT\(threadIdx.x != 11\) failed at .*selftest.cu:\d+",
    "too_much_shared": r"40000 bytes of static and 10000 bytes of dynamic shared memory, more than 48 KiB",
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("which", list(FAULTS))
def test_faults_a_gpu_would_not_report(lib, which, schedule):
    lib.set_schedule(schedule, 6)
    with pytest.raises(RuntimeError, match=FAULTS[which]) as info:
        S.fault(ints(64), which)
    message = str(info.value)
    assert message.startswith("CUDA emulation: ")
    # The launch site is the kernel launch's own line in the .cu file.
    assert re.search(r"_kernel launched at tests/cuda_emulation/kernels/selftest.cu:\d+ with grid", message)
    assert f"schedule {schedule}" in message


def test_a_fault_leaves_the_runtime_usable(lib):
    with pytest.raises(RuntimeError):
        S.fault(ints(64), "deadlock")
    lib.set_schedule("forward")
    out = ints(64, 12)
    S.warp_ops(out)
    assert int(out[0, 10]) == 22


def test_launch_errors_wait_for_cuda_get_last_error(lib):
    lib.take_last_error()
    with pytest.raises(RuntimeError, match="CUDA error: invalid configuration argument"):
        S.bad_launch(ints(1), True)
    before = lib.stats()["launches"]
    S.bad_launch(ints(1), False)  # a GPU says nothing either
    assert lib.stats()["launches"] == before, "nothing ran"
    assert lib.take_last_error() == 9 and lib.take_last_error() == 0  # cudaErrorInvalidConfiguration, then cleared
    with pytest.raises(RuntimeError, match="never checked cudaGetLastError"):
        harness.checked(S.bad_launch, lib, "bad_launch")(ints(1), False)


# --- the routing of sparsebert's ops --------------------------------------------------------


def test_every_op_has_an_emulated_cuda_kernel(lib):
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparsebert::")}
    assert set(harness.emulated_op_names(lib)) == ops


def test_routing_runs_the_emulated_kernels_and_restores_the_cpu_ones(lib):
    x = torch.randn(8, 40)
    real = torch._C._dispatch_dump("sparsebert::nm_mask")
    with harness.emulate("random", "routing") as emu:
        before = emu.stats()["launches"]
        routed = torch.ops.sparsebert.nm_mask(x, 2, 4, True)
        assert emu.stats()["launches"] > before
        with harness.cpu_kernels():
            before = emu.stats()["launches"]
            oracle = torch.ops.sparsebert.nm_mask(x, 2, 4, True)
            assert emu.stats()["launches"] == before
        assert torch.equal(routed, oracle)
    assert torch._C._dispatch_dump("sparsebert::nm_mask") == real


# --- the source rewrite ---------------------------------------------------------------------


def test_rewrite_keeps_every_line_in_place():
    for path in build.cuda_sources():
        text = (build.ROOT / path).read_text()
        out = rewrite.rewrite(text, path, {"sparsebert": "sparsebert_emu"})
        head, body = out.split("\n", 1)
        assert head == f'#line 1 "{path}"'
        assert body.count("\n") == text.count("\n")
        assert "<<<" not in body and "TORCH_LIBRARY_IMPL(sparsebert," not in body


def test_rewrite_of_each_construct():
    src = """// a comment with kernel<<<1, 2>>>() and __shared__ int x;
__global__ void k(int* p) {
  extern __shared__ __align__(16) float dyn[];
  __shared__ typename Scan::TempStorage storage;
  __shared__ __align__(32) T tile[16][16 + 8];
}
void host(at::Tensor t) {
  auto h = at::empty({2}, at::TensorOptions().pinned_memory(true));
  my::kernel<float, 4><<<dim3(2, 3),
                        256, 0, stream>>>(t.data_ptr<int>());
  const char* s = "<<<not a launch>>>";
  CUDA_KERNEL_ASSERT(s != nullptr);
}
TORCH_LIBRARY_IMPL(myns, CUDA, m) {}
"""
    out = rewrite.rewrite(src, "x.cu", {"myns": "myns_emu"}).split("\n")[1:]
    assert out[0] == src.split("\n")[0]
    assert out[2].strip() == "float* const dyn = ::emu::dynamic_shared_as<float>();"
    assert out[3].strip() == ("static typename Scan::TempStorage storage; "
                              "::emu::shared_variable(&storage, sizeof(storage));")
    assert out[4].strip() == "static __align__(32) T tile[16][16 + 8]; ::emu::shared_variable(&tile, sizeof(tile));"
    assert ".pinned_memory(false)" in out[7]
    assert out[8].strip() == ('::emu::launch("my::kernel<float, 4>", ::emu::Loc::current(), my::kernel<float, 4>, '
                              'dim3(2, 3),')
    assert out[9].strip() == "256, 0, stream)(t.data_ptr<int>());"
    assert out[10] == src.split("\n")[10]
    assert out[11].strip() == "EMU_KERNEL_ASSERT(s != nullptr);"
    assert out[13] == "TORCH_LIBRARY_IMPL(myns_emu, CPU, m) {}"
    with pytest.raises(rewrite.RewriteError, match="no emulated namespace given for myns"):
        rewrite.rewrite(src, "x.cu", {})


def test_schemas_come_from_registration_cpp():
    text = (build.ROOT / build.SCHEMAS).read_text()
    unit = rewrite.schema_unit(text, build.SCHEMAS, "sparsebert", ["a", "b"])
    defs = re.findall(r'm\.def\(', text)
    assert unit.count("m.def(") == 2 * len(defs)
    assert "TORCH_LIBRARY(a, m)" in unit and "TORCH_LIBRARY(b, m)" in unit
    assert "PyInit" not in unit
