"""masked_adamw_ / masked_sgd_ and MaskedAdamW / MaskedSGD against torch.optim as the oracle."""
import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import cpu_kernels, cuda_devices, devices, requires_cuda
from sparsebert.ops import masked_adamw_, masked_sgd_, pack_mask
from sparsebert.optim import MaskChanged, MaskedAdamW, MaskedSGD

# (300, 77): several 16384-element chunks whose boundaries fall inside rows, and rows whose
# length is not a multiple of 8; (5, 3, 10): a 3-D weight; (77,): a dense bias.
SHAPES = [(300, 77), (16, 24), (5, 3, 10), (77,)]
MASKED = [True, True, True, False]
STEPS = 50


def tolerances(dtype):
    # torch's own CPU kernels use fused multiply-adds in places (add with alpha), ours round every
    # operation: agreement is to a few ulps of the O(1) gradients.
    return dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)


def make_problem(device, dtype, density=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, keeps = [], []
    for shape, masked in zip(SHAPES, MASKED):
        params.append(torch.randn(shape, generator=gen, dtype=dtype).to(device))
        keeps.append((torch.rand(shape, generator=gen) < density).to(device) if masked else None)
    return params, keeps


def grads_for(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]


def packed(keeps):
    return [pack_mask(k) if k is not None else None for k in keeps]


def reference_masked_step(ref_opt, ref_params, grads, keeps):
    """torch.optim on masked gradients, with weights and state zeroed at pruned positions:
    the same as the optimizer over the kept weights alone."""
    for p, g, k in zip(ref_params, grads, keeps):
        p.grad = g.clone() if k is None else torch.where(k, g, 0)
        if k is not None:
            p.data.mul_(k)
            for v in ref_opt.state[p].values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(k)
    ref_opt.step()
    for p, k in zip(ref_params, keeps):
        if k is not None:
            p.data.mul_(k)


# ----------------------------------------------------------------------------- AdamW, op level
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_dense_matches_torch(device, dtype, maximize, weight_decay):
    params, _ = make_problem(device, dtype)
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay,
                                maximize=maximize, foreach=False)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for step in range(1, STEPS + 1):
        grads = grads_for(params, step)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        ref_opt.step()
        masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, [None] * len(params), step, 1e-2, 0.8, 0.99, 1e-6,
                      weight_decay, maximize=maximize)
    for p, r, m, v in zip(params, ref, exp_avgs, exp_avg_sqs):
        torch.testing.assert_close(p, r.detach(), **tolerances(dtype))
        torch.testing.assert_close(m, ref_opt.state[r]["exp_avg"], **tolerances(dtype))
        torch.testing.assert_close(v, ref_opt.state[r]["exp_avg_sq"], **tolerances(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_masked_matches_kept_weights_and_compact_matches_dense(device, dtype):
    params, keeps = make_problem(device, dtype)
    masks = packed(keeps)
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05, foreach=False)
    compact = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    nnz = [int(k.sum()) if k is not None else None for k in keeps]
    mc = [torch.zeros(n, dtype=dtype, device=device) if n is not None else torch.zeros_like(p) for n, p in zip(nnz, params)]
    vc = [t.clone() for t in mc]
    for c, k in zip(compact, keeps):
        if k is not None:
            c.mul_(k)  # compact mode expects pruned weights already 0
    for step in range(1, STEPS + 1):
        grads = grads_for(params, step)
        grads[0].view(-1)[(~keeps[0]).view(-1).nonzero()[:3]] = float("nan")  # pruned NaN: ignored
        reference_masked_step(ref_opt, ref, grads, keeps)
        masked_adamw_(params, grads, m, v, masks, step, 1e-2, 0.9, 0.999, 1e-8, 0.05)
        masked_adamw_(compact, grads, mc, vc, masks, step, 1e-2, 0.9, 0.999, 1e-8, 0.05, compact=True)
        for p, k, a, b in zip(params, keeps, m, v):
            if k is not None:
                assert (p[~k] == 0).all() and (a[~k] == 0).all() and (b[~k] == 0).all()
    for i, k in enumerate(keeps):
        torch.testing.assert_close(params[i], ref[i].detach(), **tolerances(dtype))
        assert torch.equal(compact[i], params[i])
        if k is None:
            assert torch.equal(mc[i], m[i]) and torch.equal(vc[i], v[i])
        else:
            assert mc[i].numel() == nnz[i]
            assert torch.equal(mc[i], m[i][k]) and torch.equal(vc[i], v[i][k])
            torch.testing.assert_close(m[i][k], ref_opt.state[ref[i]]["exp_avg"][k], **tolerances(dtype))


@pytest.mark.parametrize("device", devices())
def test_adamw_compact_matches_dense_at_high_sparsity(device):
    """90% sparsity, rows of whole 16-lane groups, many all-pruned groups and several chunks:
    compact state is bit-identical to dense state."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(160, 256), (48, 768), (40, 100)]
    keeps = [(torch.rand(s, generator=gen) >= 0.9).to(device) for s in shapes]
    params = [(torch.randn(s, generator=gen) * k.cpu()).to(device) for s, k in zip(shapes, keeps)]
    masks = packed(keeps)
    compact = [p.clone() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    mc = [torch.zeros(int(k.sum()), device=device) for k in keeps]
    vc = [t.clone() for t in mc]
    for step in range(1, 6):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        masked_adamw_(params, grads, m, v, masks, step, 1e-2, 0.9, 0.999, 1e-8, 0.05)
        masked_adamw_(compact, grads, mc, vc, masks, step, 1e-2, 0.9, 0.999, 1e-8, 0.05, compact=True)
    for i, k in enumerate(keeps):
        assert torch.equal(compact[i], params[i])
        assert torch.equal(mc[i], m[i][k]) and torch.equal(vc[i], v[i][k])


# ----------------------------------------------------------------------------- kernel paths
# The CPU kernels pick, per 16384-element chunk, whether the NaN/Inf check copies the kept
# gradients for the update (at most a quarter kept) or the update reads the gradients again;
# and, per process, AVX-512 or the portable loops. These shapes have rows that are not whole
# groups of 16 (or 8) and chunks that start inside rows; a 1-D masked tensor spans three chunks;
# the density changes along each tensor, so that one tensor has chunks of both kinds; and
# stretches of kept weights give compact state whole vectors of consecutive ones.
PATH_SHAPES = [(300, 77), (40000,), (65, 256), (5, 3, 10), (7,)]


def uniform(shape, gen, dtype):
    # Not randn: torch's normal sampler rounds differently per CPU capability, and the inputs
    # must be the same bits in a process with ATEN_CPU_CAPABILITY=default.
    return torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1


def path_grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [uniform(p.shape, gen, p.dtype) for p in params]


def path_problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, keeps = [], []
    for shape in PATH_SHAPES:
        params.append(uniform(shape, gen, dtype))
        n = params[-1].numel()
        density = torch.where(torch.arange(n) % 30000 < 16384, 0.1, 0.6)
        density[torch.arange(n) % 1000 < 40] = 1.0  # stretches of 40 kept, across groups and rows
        keeps.append(torch.rand(shape, generator=gen) < density.view(shape) if len(shape) > 1 or n > 7 else None)
    return params, keeps


def pruned_garbage(n, dtype):
    """What stale values at pruned positions may hold (a pruning step's): NaN, -0.0, non-zeros, 0."""
    return torch.tensor([float("nan"), -0.0, 1.5, 0.0], dtype=dtype).repeat((n + 3) // 4)[:n]


def is_plus_zero(t):
    return bool((t == 0).all() and not t.signbit().any())


def kernel_path_results(steps=3):
    """Weights and state after a few steps of every op, state mode and check_finite setting,
    float32 and float64 (for the comparison across processes below). Pruned gradients hold NaN,
    which every path must ignore, and so does dense state at pruned positions at the start."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        for op in ("adamw", "sgd", "sgd-plain"):
            for compact in (False, True):
                for check in (True, False):
                    params, keeps = path_problem(dtype)
                    params = [p * k if k is not None else p for p, k in zip(params, keeps)]
                    masks = packed(keeps)
                    n_states = 2 if op == "adamw" else (1 if op == "sgd" else 0)
                    states = [[torch.zeros(int(k.sum()), dtype=dtype) if compact and k is not None else torch.zeros_like(p)
                               for p, k in zip(params, keeps)] for _ in range(n_states)]
                    if not compact:
                        for s in states:
                            for t, k in zip(s, keeps):
                                if k is not None:
                                    t[~k] = pruned_garbage(int((~k).sum()), dtype)
                    for step in range(1, steps + 1):
                        grads = path_grads(params, step)
                        for g, k in zip(grads, keeps):
                            if k is not None:
                                g[~k] = float("nan")
                        if op == "adamw":
                            masked_adamw_(params, grads, *states, masks, step, 1e-2, 0.9, 0.999, 1e-8, 0.05,
                                          compact=compact, check_finite=check)
                        else:
                            masked_sgd_(params, grads, states[0] if states else [], masks, 0.05,
                                        momentum=0.9 if op == "sgd" else 0.0, weight_decay=0.01, nesterov=op == "sgd",
                                        first_step=step == 1, compact=compact, check_finite=check)
                    out[f"{dtype}-{op}-compact={compact}-check={check}"] = params + [t for s in states for t in s]
    return out


def test_kernel_paths_agree_bit_for_bit_and_match_torch():
    """With and without the check pass (which moves the gradients of sparse chunks into a
    workspace), dense and compact state give the same bits; and they match torch.optim."""
    results = kernel_path_results()
    for dtype in (torch.float32, torch.float64):
        for op in ("adamw", "sgd", "sgd-plain"):
            base = results[f"{dtype}-{op}-compact=False-check=True"]
            assert all(torch.equal(a, b) for a, b in zip(base, results[f"{dtype}-{op}-compact=False-check=False"]))
            params, keeps = path_problem(dtype)
            for compact_check in (True, False):
                compact = results[f"{dtype}-{op}-compact=True-check={compact_check}"]
                for i, k in enumerate(keeps):
                    assert torch.equal(compact[i], base[i])
                    if k is not None:
                        assert (base[i][~k] == 0).all()
            for i, state in enumerate(base[len(keeps):]):  # dense state: stale values at pruned positions -> +0.0
                k = keeps[i % len(keeps)]
                if k is not None:
                    assert is_plus_zero(state[~k]), f"{dtype} {op}: state {i} keeps a stale value at a pruned position"
    params, keeps = path_problem(torch.float64)
    ref = [torch.nn.Parameter(p * k if k is not None else p.clone()) for p, k in zip(params, keeps)]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(1, 4):
        reference_masked_step(ref_opt, ref, path_grads(params, step), keeps)
    got = results[f"{torch.float64}-adamw-compact=False-check=True"]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.detach(), **tolerances(torch.float64))


@pytest.mark.parametrize("check", [False, True])
def test_dense_state_writes_stale_pruned_weights_and_state_to_plus_zero(check):
    """With dense state, every value at a pruned position, weight or state (NaN, -0.0, non-zero, as
    a pruning step leaves them), becomes +0.0 in one step, and the kept weights do not depend on them."""
    for dtype in (torch.float32, torch.float64):
        params, keeps = path_problem(dtype)
        grads = path_grads(params, 1)
        results = []
        for stale in (True, False):
            ps = [p.clone() if stale or k is None else p * k for p, k in zip(params, keeps)]
            if stale:
                for p, k in zip(ps, keeps):
                    if k is not None:
                        p.view(-1)[(~k).view(-1).nonzero()[::5, 0]] = -0.0  # some pruned weights -0.0
            states = [[torch.zeros_like(p) for p in ps] for _ in range(2)]
            for s in states if stale else []:
                for t, k in zip(s, keeps):
                    if k is not None:
                        t[~k] = pruned_garbage(int((~k).sum()), dtype)
            masked_adamw_(ps, grads, *states, packed(keeps), 1, 1e-2, 0.9, 0.999, 1e-8, 0.05, check_finite=check)
            results.append(ps + states[0] + states[1])
            for i, k in enumerate(keeps * 3):
                if k is not None:
                    assert is_plus_zero(results[-1][i][~k]), f"{dtype}: tensor {i} keeps a stale pruned value"
        assert all(torch.equal(a, b) for a, b in zip(*results))


def test_portable_kernels_match_avx512_bit_for_bit(tmp_path):
    """ATEN_CPU_CAPABILITY=default makes the kernels take their portable loops (as it makes
    torch's): they give the same bits as the AVX-512 ones (on a CPU without AVX-512, both runs
    take the portable loops)."""
    out = tmp_path / "portable.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import test_masked_optim as t; "
            "torch.save(t.kernel_path_results(), sys.argv[2])")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, "-c", code, str(pathlib.Path(__file__).parent), str(out)], env=env, check=True)
    portable = torch.load(out)
    here = kernel_path_results()
    assert portable.keys() == here.keys()
    for name, tensors in here.items():
        for i, (a, b) in enumerate(zip(tensors, portable[name])):
            assert torch.equal(a, b), f"{name}: tensor {i} differs between the AVX-512 and the portable loops"


def test_nan_at_kept_position_of_sparse_chunk_raises_before_any_write():
    params, keeps = path_problem(torch.float32)
    masks = packed(keeps)
    for compact in (False, True):
        ps = [p * k if k is not None else p.clone() for p, k in zip(params, keeps)]
        st = [[torch.rand(int(k.sum())) if compact and k is not None else torch.rand(p.shape) for p, k in zip(ps, keeps)]
              for _ in range(2)]
        grads = path_grads(ps, 1)
        flat_keep = keeps[1].view(-1)
        grads[1][flat_keep.nonzero()[-1]] = float("inf")  # the last chunk of the 1-D tensor: sparse
        before = [t.clone() for t in ps + st[0] + st[1]]
        with pytest.raises(RuntimeError, match=r"grads\[1\] contains NaN or Inf at a kept position"):
            masked_adamw_(ps, grads, st[0], st[1], masks, 1, 1e-2, 0.9, 0.999, 1e-8, 0.0, compact=compact)
        assert all(torch.equal(a, b) for a, b in zip(ps + st[0] + st[1], before))


# ----------------------------------------------------------------------------- SGD, op level
SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.3, nesterov=False, weight_decay=0.01, maximize=False),
    dict(momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1, maximize=True),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_matches_torch_dense_masked_compact(device, dtype, cfg):
    params, keeps = make_problem(device, dtype)
    masks = packed(keeps)
    dense = [p.clone() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    ref_masked = [p.clone().requires_grad_() for p in params]
    ref_opt = torch.optim.SGD(ref, lr=0.05, foreach=False, **cfg)
    ref_masked_opt = torch.optim.SGD(ref_masked, lr=0.05, foreach=False, **cfg)
    compact = [p * k if k is not None else p.clone() for p, k in zip(params, keeps)]
    has_buf = cfg["momentum"] != 0
    buf_dense = [torch.zeros_like(p) for p in params] if has_buf else []
    buf_masked = [torch.zeros_like(p) for p in params] if has_buf else []
    buf_compact = ([torch.zeros(int(k.sum()), dtype=dtype, device=device) if k is not None else torch.zeros_like(p)
                    for p, k in zip(params, keeps)] if has_buf else [])
    args = dict(lr=0.05, momentum=cfg["momentum"], dampening=cfg["dampening"], weight_decay=cfg["weight_decay"],
                nesterov=cfg["nesterov"], maximize=cfg["maximize"])
    for step in range(1, 21):
        grads = grads_for(params, step)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        ref_opt.step()
        reference_masked_step(ref_masked_opt, ref_masked, grads, keeps)
        masked_sgd_(dense, grads, buf_dense, [None] * len(params), first_step=step == 1, **args)
        masked_sgd_(params, grads, buf_masked, masks, first_step=step == 1, **args)
        masked_sgd_(compact, grads, buf_compact, masks, first_step=step == 1, compact=True, **args)
        for p, k in zip(params, keeps):
            if k is not None:
                assert (p[~k] == 0).all()
    for i, k in enumerate(keeps):
        torch.testing.assert_close(dense[i], ref[i].detach(), **tolerances(dtype))
        torch.testing.assert_close(params[i], ref_masked[i].detach(), **tolerances(dtype))
        assert torch.equal(compact[i], params[i])
        if has_buf:
            torch.testing.assert_close(buf_dense[i], ref_opt.state[ref[i]]["momentum_buffer"], **tolerances(dtype))
            if k is not None:
                assert (buf_masked[i][~k] == 0).all()
                assert torch.equal(buf_compact[i], buf_masked[i][k])


# ----------------------------------------------------------------------------- optimizers
def make_model_params(device, dtype=torch.float32, seed=0):
    params, keeps = make_problem(device, dtype, seed=seed)
    return [torch.nn.Parameter(p) for p in params], keeps


def run_optimizer(opt, params, keeps, steps, first=1, skip=None):
    for step in range(first, first + steps):
        for i, (p, g) in enumerate(zip(params, grads_for(params, step))):
            p.grad = None if skip is not None and i == skip else g
        opt.step()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("compact", [False, True])
def test_masked_adamw_optimizer_matches_torch_with_groups(device, compact):
    params, keeps = make_model_params(device)
    masks = packed(keeps)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = [dict(params=params[:2], masks=masks[:2]), dict(params=params[2:], masks=masks[2:], lr=3e-3, weight_decay=0.0)]
    opt = MaskedAdamW(groups, lr=1e-2, betas=(0.85, 0.995), weight_decay=0.1, compact=compact)
    ref_opt = torch.optim.AdamW([dict(params=ref[:2]), dict(params=ref[2:], lr=3e-3, weight_decay=0.0)], lr=1e-2,
                                betas=(0.85, 0.995), weight_decay=0.1, foreach=False)
    for step in range(1, 31):
        grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        reference_masked_step(ref_opt, ref, grads, keeps)
    for p, r, k in zip(params, ref, keeps):
        torch.testing.assert_close(p.detach(), r.detach(), **tolerances(torch.float32))
        state = opt.state[p]
        assert int(state["step"]) == 30
        if k is not None and compact:
            assert state["exp_avg"].shape == (int(k.sum()),)
            torch.testing.assert_close(state["exp_avg"], ref_opt.state[r]["exp_avg"][k], **tolerances(torch.float32))
        else:
            assert state["exp_avg"].shape == p.shape


@pytest.mark.parametrize("device", devices())
def test_masked_sgd_optimizer_matches_torch_and_skips_params_without_grad(device):
    params, keeps = make_model_params(device)
    opt = MaskedSGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                    masks={p: m for p, m in zip(params, packed(keeps)) if m is not None})
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False)
    frozen = params[1].detach().clone()
    for step in range(1, 16):
        grads = grads_for(params, step)
        for i, (p, r, g) in enumerate(zip(params, ref, grads)):
            p.grad = None if i == 1 else g
            r.grad = None if i == 1 else (g * keeps[i] if keeps[i] is not None else g)
        opt.step()
        ref_opt.step()
        for r, k in zip(ref, keeps):
            if k is not None:
                r.data.mul_(k)
    assert torch.equal(params[1].detach(), frozen) and len(opt.state[params[1]]) == 0
    for i in (0, 2, 3):
        torch.testing.assert_close(params[i].detach(), ref[i].detach(), **tolerances(torch.float32))


@pytest.mark.parametrize("device", devices())
def test_masks_are_held_by_reference(device):
    params, keeps = make_model_params(device)
    masks = packed(keeps)
    opt = MaskedAdamW([dict(params=params, masks=masks)], lr=1e-2)
    run_optimizer(opt, params, keeps, 3)
    new_keep = keeps[0] & (torch.rand(keeps[0].shape, device=device) < 0.5)
    masks[0].copy_(pack_mask(new_keep))  # a pruner updates the module's mask in place
    run_optimizer(opt, params, keeps, 1, first=4)
    assert (params[0][~new_keep] == 0).all()
    assert (opt.state[params[0]]["exp_avg"][~new_keep] == 0).all()
    assert (params[0][new_keep] != 0).all()


@pytest.mark.parametrize("device", devices())
def test_compact_mask_change_raises_and_compact_state_remaps(device):
    params, keeps = make_model_params(device)
    masks = packed(keeps)
    opt = MaskedAdamW([dict(params=params, masks=masks)], lr=1e-2, compact=True)
    run_optimizer(opt, params, keeps, 3)
    old_state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    old_params = [p.detach().clone() for p in params]
    new_keep = keeps[0] & (torch.rand(keeps[0].shape, device=device) < 0.5)
    masks[0].copy_(pack_mask(new_keep))
    with pytest.raises(RuntimeError, match=r"compact_state_"):
        run_optimizer(opt, params, keeps, 1, first=4)
    for p, old in zip(params, old_params):
        assert torch.equal(p.detach(), old)
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in old_state.items())
    opt.compact_state_([params[0]])
    state = opt.state[params[0]]
    dense = torch.zeros_like(params[0])
    dense[keeps[0]] = old_state["exp_avg"]
    assert torch.equal(state["exp_avg"], dense[new_keep])
    assert (params[0][~new_keep] == 0).all()
    run_optimizer(opt, params, keeps, 1, first=4)
    assert int(state["step"]) == 4 and (params[0][~new_keep] == 0).all()


OPTIMIZERS = {
    "adamw": lambda params, **kw: MaskedAdamW(params, lr=1e-2, **kw),
    "sgd": lambda params, **kw: MaskedSGD(params, lr=0.1, **kw),
    "sgd-momentum": lambda params, **kw: MaskedSGD(params, lr=0.1, momentum=0.9, **kw),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("compact", [False, True])
def test_every_optimizer_and_mode_zeroes_pruned_weights_from_the_first_step(device, kind, compact):
    params, keeps = make_model_params(device)  # non-zero at pruned positions, as after one-shot pruning
    opt = OPTIMIZERS[kind](params, masks={p: m for p, m in zip(params, packed(keeps)) if m is not None}, compact=compact)
    for step in (1, 2):
        run_optimizer(opt, params, keeps, 1, first=step)
        for p, k in zip(params, keeps):
            if k is not None:
                assert (p[~k] == 0).all(), f"step {step}: pruned weights are not 0"
                assert (p[k] != 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_compact_mask_change_with_the_same_popcount_raises(device, kind):
    params, keeps = make_model_params(device)
    masks = packed(keeps)
    opt = OPTIMIZERS[kind](params, masks={p: m for p, m in zip(params, masks) if m is not None}, compact=True)
    run_optimizer(opt, params, keeps, 2)
    moved = keeps[0].clone().flatten()
    kept, pruned = moved.nonzero()[0], (~moved).nonzero()[0]
    moved[kept], moved[pruned] = False, True  # one weight pruned, another kept: the same count
    masks[0].copy_(pack_mask(moved.view(keeps[0].shape)))
    before = [p.detach().clone() for p in params]
    with pytest.raises(MaskChanged, match="compact_state_"):
        run_optimizer(opt, params, keeps, 1, first=3)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum"])
@pytest.mark.parametrize("compact", [False, True])
def test_non_contiguous_parameters_and_masks_step_like_contiguous_ones(device, kind, compact):
    params, keeps = make_model_params(device)
    masks = packed(keeps)
    # The same values through transposed / strided storage, and a strided view of the first mask.
    strided = [torch.nn.Parameter(p.detach().mT.contiguous().mT) if p.dim() >= 2 else
               torch.nn.Parameter(p.detach().repeat_interleave(2)[::2]) for p in params]
    assert not any(p.is_contiguous() for p in strided)
    strided_masks = list(masks)
    strided_masks[0] = masks[0].repeat_interleave(2, dim=0)[::2]
    assert not strided_masks[0].is_contiguous()
    opt = OPTIMIZERS[kind](params, masks={p: m for p, m in zip(params, masks) if m is not None}, compact=compact)
    opt_strided = OPTIMIZERS[kind](strided, masks={p: m for p, m in zip(strided, strided_masks) if m is not None},
                                   compact=compact)
    run_optimizer(opt, params, keeps, 3)
    run_optimizer(opt_strided, strided, keeps, 3)
    for p, s in zip(params, strided):
        assert torch.equal(p.detach(), s.detach())
    # As torch.optim accepts them: the same values as torch.optim.AdamW on dense, non-contiguous params.
    if kind == "adamw" and not compact:
        ref = [torch.nn.Parameter(p.detach().clone()) for p in strided]
        dense = MaskedAdamW(strided, lr=1e-2)
        ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
        run_optimizer(dense, strided, keeps, 2)
        run_optimizer(ref_opt, ref, keeps, 2)
        for p, r in zip(strided, ref):
            torch.testing.assert_close(p.detach(), r.detach(), **tolerances(torch.float32))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["adamw", "adamw-compact", "sgd", "sgd-compact"])
def test_state_dict_round_trip_continues_identically(device, kind):
    def build(params, masks):
        groups = [dict(params=params[:2], masks=masks[:2]), dict(params=params[2:], masks=masks[2:], lr=2e-3)]
        if kind.startswith("adamw"):
            return MaskedAdamW(groups, lr=1e-2, compact=kind.endswith("compact"))
        return MaskedSGD(groups, lr=1e-2, momentum=0.9, dampening=0.1, compact=kind.endswith("compact"))

    params, keeps = make_model_params(device)
    masks = packed(keeps)
    opt = build(params, masks)
    run_optimizer(opt, params, keeps, 5)
    saved = copy.deepcopy(opt.state_dict())
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = build(fresh_params, [m.clone() if m is not None else None for m in masks])
    fresh.load_state_dict(saved)
    for p, f in zip(params, fresh_params):
        for name, value in opt.state[p].items():
            assert torch.equal(value, fresh.state[f][name]) and value.dtype == fresh.state[f][name].dtype
            assert value is not fresh.state[f][name]
    run_optimizer(opt, params, keeps, 5, first=6)
    run_optimizer(fresh, fresh_params, keeps, 5, first=6)
    for p, f in zip(params, fresh_params):
        assert torch.equal(p, f)
        for name, value in opt.state[p].items():
            assert torch.equal(value, fresh.state[f][name])
    assert [g["lr"] for g in fresh.param_groups] == [1e-2, 2e-3]


@pytest.mark.parametrize("device", devices())
def test_zero_grad_and_state_nbytes(device):
    params, keeps = make_model_params(device)
    opt = MaskedAdamW([dict(params=params, masks=packed(keeps))], compact=True)
    run_optimizer(opt, params, keeps, 1)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    nnz = sum(int(k.sum()) if k is not None else p.numel() for p, k in zip(params, keeps))
    mask_bytes = sum(opt.state[p]["compact_mask"].numel() for p in params[:3])
    assert opt.state_nbytes() == 2 * 4 * nnz + 4 * len(params) + mask_bytes


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("compact", [False, True])
def test_opcheck(device, compact):
    params = [torch.randn(6, 13, device=device), torch.randn(9, device=device)]
    keeps = [torch.rand(6, 13, device=device) < 0.5, None]
    masks = packed(keeps)
    grads = [torch.randn_like(p) for p in params]
    n = int(keeps[0].sum())
    state = lambda: [torch.rand(n, device=device) if compact else torch.rand(6, 13, device=device), torch.rand(9, device=device)]
    torch.library.opcheck(torch.ops.sparsebert.masked_adamw_.default,
                          (params, grads, state(), state(), masks, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, False, compact, True))
    torch.library.opcheck(torch.ops.sparsebert.masked_sgd_.default,
                          (params, grads, state(), masks, 1e-3, 0.9, 0.0, 0.01, True, False, False, compact, True))
    torch.library.opcheck(torch.ops.sparsebert.masked_sgd_.default,
                          (params, grads, [], masks, 1e-3, 0.0, 0.0, 0.0, False, True, False, compact, False))


# ----------------------------------------------------------------------------- errors
def error_cases(device):
    """(name, kwargs overriding a valid masked_adamw_ call, expected message)."""

    def base():
        params = [torch.randn(6, 13, device=device), torch.randn(9, device=device)]
        keep = torch.rand(6, 13, device=device) < 0.5
        n = int(keep.sum())
        return dict(
            params=params, grads=[torch.randn_like(p) for p in params],
            exp_avgs=[torch.rand(6, 13, device=device), torch.rand(9, device=device)],
            exp_avg_sqs=[torch.rand(6, 13, device=device), torch.rand(9, device=device)],
            masks=[pack_mask(keep), None], compact=False, keep=keep, n=n,
        )

    cases = []

    def case(name, edit, match):
        kw = base()
        edit(kw)
        cases.append(pytest.param(kw, match, id=name))

    case("grads-length", lambda k: k["grads"].pop(), r"2 params but 1 grads")
    case("masks-length", lambda k: k["masks"].append(None), r"2 params but 3 masks")
    case("state-length", lambda k: k["exp_avg_sqs"].pop(), r"2 params but 1 exp_avg_sqs")
    case("grad-dtype", lambda k: k["grads"].__setitem__(1, k["grads"][1].double()), r"grads\[1\] has dtype")
    case("param-dtype", lambda k: k["params"].__setitem__(1, k["params"][1].double()), r"params\[1\] has dtype")
    case("state-dtype", lambda k: k["exp_avgs"].__setitem__(1, k["exp_avgs"][1].double()), r"exp_avgs\[1\] has dtype")
    case("grad-shape", lambda k: k["grads"].__setitem__(0, torch.randn(13, 6, device=device)), r"grads\[0\] has shape")
    case("state-shape", lambda k: k["exp_avgs"].__setitem__(1, torch.rand(10, device=device)), r"exp_avgs\[1\] has shape")
    case("mask-shape", lambda k: k["masks"].__setitem__(0, k["masks"][0][:, :1].contiguous()), r"masks\[0\] has shape")
    case("mask-dtype", lambda k: k["masks"].__setitem__(0, k["masks"][0].bool()), r"masks\[0\] must be a bit-packed uint8")
    case("mask-on-vector-of-wrong-rank", lambda k: k["masks"].__setitem__(1, torch.zeros(2, 2, dtype=torch.uint8, device=device)),
         r"masks\[1\] has 2 dimensions")
    case("non-contiguous-grad", lambda k: k["grads"].__setitem__(0, torch.randn(13, 6, device=device).t()), r"grads\[0\] must be contiguous")

    def compact_wrong_length(k):
        k["compact"] = True
        k["exp_avgs"][0] = torch.rand(k["n"] + 1, device=device)
        k["exp_avg_sqs"][0] = torch.rand(k["n"] + 1, device=device)
    case("compact-length", compact_wrong_length, r"compact state exp_avgs\[0\] has .* entries but masks\[0\] keeps")

    def compact_dense_shaped(k):
        k["compact"] = True
    case("compact-not-1d", compact_dense_shaped, r"compact state exp_avgs\[0\] must be 1-D")

    def nan_grad(k):
        g = k["grads"][0].view(-1)
        g[k["keep"].view(-1).nonzero()[0]] = float("nan")
    case("nan-grad-kept", nan_grad, r"grads\[0\] contains NaN or Inf at a kept position")
    case("inf-grad-dense", lambda k: k["grads"][1].__setitem__(4, float("inf")), r"grads\[1\] contains NaN or Inf")

    def nan_grad_compact(k):
        k.update(compact=True, exp_avgs=[torch.rand(k["n"], device=device), k["exp_avgs"][1]],
                 exp_avg_sqs=[torch.rand(k["n"], device=device), k["exp_avg_sqs"][1]])
        k["grads"][1][0] = float("-inf")
    case("inf-grad-compact", nan_grad_compact, r"grads\[1\] contains NaN or Inf")
    return cases


@pytest.mark.parametrize("device", devices())
def test_errors_leave_everything_untouched(device):
    for param in error_cases(device):
        kw, match = param.values
        kw = dict(kw)
        kw.pop("keep"), kw.pop("n")
        compact = kw.pop("compact")
        before = {name: [t.clone() if t is not None else None for t in kw[name]] for name in ("params", "exp_avgs", "exp_avg_sqs")}
        with pytest.raises(RuntimeError, match=match):
            masked_adamw_(kw["params"], kw["grads"], kw["exp_avgs"], kw["exp_avg_sqs"], kw["masks"], 1, 1e-2, 0.9, 0.999,
                          1e-8, 0.01, compact=compact)
        for name, tensors in before.items():
            for t, b in zip(kw[name], tensors):
                assert torch.equal(t, b), f"{param.id}: {name} changed"


@pytest.mark.parametrize("device", devices())
def test_sgd_errors(device):
    p = [torch.randn(4, 16, device=device)]
    g = [torch.randn_like(p[0])]
    mask = [pack_mask(torch.rand(4, 16, device=device) < 0.5)]
    before = p[0].clone()
    with pytest.raises(RuntimeError, match=r"momentum is 0, so momentum_buffers must be empty"):
        masked_sgd_(p, g, [torch.zeros_like(p[0])], mask, lr=0.1, momentum=0.0)
    with pytest.raises(RuntimeError, match=r"1 params but 0 momentum_buffers"):
        masked_sgd_(p, g, [], mask, lr=0.1, momentum=0.9)
    g[0][1, 3] = float("nan")
    mask_all = [pack_mask(torch.ones(4, 16, dtype=torch.bool, device=device))]
    with pytest.raises(RuntimeError, match=r"grads\[0\] contains NaN or Inf"):
        masked_sgd_(p, g, [], mask_all, lr=0.1)
    assert torch.equal(p[0], before)
    masked_sgd_(p, g, [], mask_all, lr=0.1, check_finite=False)  # no pre-pass: NaN goes through
    assert torch.isnan(p[0][1, 3])


def test_cpu_rejects_half_params():
    p = [torch.randn(4, 8).half()]
    with pytest.raises(RuntimeError, match=r"not supported on cpu"):
        masked_adamw_(p, [torch.randn_like(p[0])], [torch.zeros_like(p[0])], [torch.zeros_like(p[0])], [None], 1, 1e-3,
                      0.9, 0.999, 1e-8, 0.0)


@requires_cuda
def test_device_mismatch_raises():
    p = [torch.randn(4, 8, device="cuda")]
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on cpu"):
        masked_adamw_(p, [torch.randn(4, 8)], [torch.zeros_like(p[0])], [torch.zeros_like(p[0])], [None], 1, 1e-3,
                      0.9, 0.999, 1e-8, 0.0)


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
def test_cuda_reduced_precision_params_with_float32_state(device, dtype, compact):
    params, keeps = make_problem(device, torch.float32)
    low = [p.to(dtype) for p in params]
    ref = [p.float() for p in low]  # the float32 math of the kernel on rounded weights
    masks = packed(keeps)
    nnz = [int(k.sum()) if k is not None else None for k in keeps]

    def state():
        return [torch.zeros(n, device=device) if compact and n is not None else torch.zeros(p.shape, device=device)
                for n, p in zip(nnz, params)]
    m, v, rm, rv = state(), state(), [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    if compact:
        low = [p * k if k is not None else p for p, k in zip(low, keeps)]
        ref = [p.float() for p in low]
    grads = grads_for(params, 1)
    masked_adamw_(low, [g.to(dtype) for g in grads], m, v, masks, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1, compact=compact)
    masked_adamw_(ref, [g.to(dtype).float() for g in grads], rm, rv, masks, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    for a, b in zip(low, ref):
        torch.testing.assert_close(a, b.to(dtype))  # up to an ulp of dtype (rounding of ulp-apart floats)


@pytest.mark.parametrize("device", cuda_devices())
def test_cuda_matches_cpu(device):
    for compact in (False, True):
        params, keeps = make_problem("cpu", torch.float32)
        masks = packed(keeps)
        nnz = [int(k.sum()) if k is not None else None for k in keeps]
        cpu = [p * k if k is not None else p.clone() for p, k in zip(params, keeps)]
        gpu = [p.to(device, copy=True) for p in cpu]  # not an alias where the device is the CPU
        st = lambda dev: [torch.zeros(n if compact and n is not None else p.numel(), device=dev).view(
            (n,) if compact and n is not None else p.shape) for n, p in zip(nnz, params)]
        mc, vc, mg, vg = st("cpu"), st("cpu"), st(device), st(device)
        for step in range(1, 6):
            grads = grads_for(params, step)
            with cpu_kernels():
                masked_adamw_(cpu, grads, mc, vc, masks, step, 1e-2, 0.9, 0.999, 1e-8, 0.1, compact=compact)
            masked_adamw_(gpu, [g.to(device) for g in grads], mg, vg,
                          [m.to(device) if m is not None else None for m in masks],
                          step, 1e-2, 0.9, 0.999, 1e-8, 0.1, compact=compact)
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
