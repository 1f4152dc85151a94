"""masked_linear / movement_linear against a pure-PyTorch reference on a float mask."""
import pytest
import torch
import torch.nn.functional as F

from sparsebert.ops import masked_linear, movement_linear, pack_mask
from conftest import cuda_devices, devices, is_emulated, requires_cuda, runs_cuda_kernels

ops = torch.ops.sparsebert

# (leading shape of x, in_features, out_features)
SHAPES = [
    ((4,), 16, 8),
    ((2, 5), 13, 7),  # in_features not a multiple of 8
    ((3,), 24, 1),  # out_features = 1
    ((), 9, 5),  # 1-D x
    ((33,), 70, 65),  # tails of every tile size
    ((2, 3, 4), 8, 3),
]


def tolerances(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
        torch.float16: dict(rtol=5e-3, atol=1e-2),
    }[dtype]


def dtypes(device):
    # bfloat16 is optional on the CPU (it runs, through ATen's bf16 GEMMs); fp16 is CUDA only.
    return [torch.float32, torch.float64, torch.bfloat16] + ([torch.float16] if runs_cuda_kernels(device) else [])


def cases():
    return [(d, t) for d in devices() for t in dtypes(d)]


def make(lead, n_in, n_out, device, dtype, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    b = torch.randn(n_out, generator=g, dtype=torch.float64)
    s = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    keep = torch.rand(n_out, n_in, generator=g) < density
    conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(x), conv(w), conv(b), conv(s), keep.to(device), pack_mask(keep).to(device)


def reference(x, w, keep, b=None):
    """y = x (W*M)^T + b in float64, masking by select on a bool mask."""
    wm = torch.where(keep, w.double(), 0.0)
    return F.linear(x.double(), wm, None if b is None else b.double())


def reference_grads(x, w, keep, grad_out):
    """(grad_x, grad_W, grad_S, grad_b) in float64 for the loss sum(y * grad_out)."""
    x, w, go = x.double(), w.double(), grad_out.double()
    wm = torch.where(keep, w, torch.zeros_like(w))
    g = go.reshape(-1, go.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return go @ wm, torch.where(keep, g, torch.zeros_like(g)), g * w, go.reshape(-1, go.shape[-1]).sum(0)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ---------------------------------------------------------------------------------------
# Forward and backward against the reference


@pytest.mark.parametrize("device,dtype", cases())
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_linear_matches_reference(device, dtype, lead, n_in, n_out, with_bias):
    x0, w0, b0, _, keep, mask = make(lead, n_in, n_out, device, dtype)
    x, w, b = leaves(x0, w0, b0)
    y = masked_linear(x, w, mask, b if with_bias else None)
    y_ref = reference(x0, w0, keep, b0 if with_bias else None)
    assert y.shape == y_ref.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **tolerances(dtype))

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    gx, gw, _, gb = reference_grads(x0, w0, keep, grad_out)
    torch.testing.assert_close(x.grad.double(), gx, **tolerances(dtype))
    torch.testing.assert_close(w.grad.double(), gw, **tolerances(dtype))
    assert (w.grad[~keep] == 0).all()
    if with_bias:
        torch.testing.assert_close(b.grad.double(), gb, **tolerances(dtype))


@pytest.mark.parametrize("device,dtype", cases())
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
def test_movement_linear_matches_reference(device, dtype, lead, n_in, n_out):
    x0, w0, b0, s0, keep, mask = make(lead, n_in, n_out, device, dtype, seed=1)
    x, w, s, b = leaves(x0, w0, s0, b0)
    y = movement_linear(x, w, s, mask, b)
    y_ref = reference(x0, w0, keep, b0)
    torch.testing.assert_close(y.double(), y_ref, **tolerances(dtype))

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    gx, gw, gs, gb = reference_grads(x0, w0, keep, grad_out)
    torch.testing.assert_close(x.grad.double(), gx, **tolerances(dtype))
    torch.testing.assert_close(w.grad.double(), gw, **tolerances(dtype))
    torch.testing.assert_close(s.grad.double(), gs, **tolerances(dtype))
    torch.testing.assert_close(b.grad.double(), gb, **tolerances(dtype))
    assert (w.grad[~keep] == 0).all()


@pytest.mark.parametrize("device,dtype", cases())
def test_movement_grad_scores_is_g_times_w_from_the_same_g(device, dtype):
    x, w, _, _, keep, mask = make((6, 3), 21, 11, device, dtype, seed=2)
    grad_out = torch.randn(6, 3, 11, device=device, dtype=dtype)
    gw, gs = ops.movement_linear_grad_weight(grad_out, x, w, mask)
    g = ops.masked_linear_grad_weight(grad_out, x, pack_mask(torch.ones_like(keep)).to(device))
    # The same G masked and multiplied: bitwise identical to the op's own outputs.
    assert torch.equal(gs, g * w)
    assert torch.equal(gw, torch.where(keep, g, torch.zeros_like(g)))


@pytest.mark.parametrize("device,dtype", cases())
def test_weight_is_masked_gives_the_same_result(device, dtype):
    x0, w0, b0, _, keep, mask = make((3, 4), 19, 10, device, dtype, seed=3)
    w0 = torch.where(keep, w0, torch.zeros_like(w0))
    outs = []
    for flag in (False, True):
        x, w, b = leaves(x0, w0, b0)
        y = masked_linear(x, w, mask, b, weight_is_masked=flag)
        y.backward(torch.ones_like(y))
        outs.append((y, x.grad, w.grad, b.grad))
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, **tolerances(dtype))
    assert (outs[1][2][~keep] == 0).all()


@pytest.mark.parametrize("device", devices())
def test_general_mode_ignores_weights_at_pruned_positions(device):
    # Movement pruning keeps large (even non-finite) weights where the mask is 0.
    x0, w0, b0, _, keep, mask = make((5,), 12, 6, device, torch.float32, seed=4)
    w0 = torch.where(keep, w0, torch.full_like(w0, float("inf")))
    x, w = leaves(x0, w0)
    y = masked_linear(x, w, mask, b0)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and (w.grad[~keep] == 0).all()


@pytest.mark.parametrize("device", devices())
def test_grad_weight_exactly_zero_when_gemm_output_is_not_finite(device):
    x = torch.full((4, 10), 1e38, device=device)
    grad_out = torch.full((4, 3), 1e38, device=device)
    keep = torch.rand(3, 10) < 0.5
    gw = ops.masked_linear_grad_weight(grad_out, x, pack_mask(keep).to(device))
    assert (gw[~keep.to(device)] == 0).all()


LAYOUTS = {
    # name: (x base from x, view back to x, weight base from w, view back to w)
    "transposed": (lambda x: x.transpose(0, 1).contiguous(), lambda t: t.transpose(0, 1),
                   lambda w: w.t().contiguous(), lambda t: t.t()),
    "strided": (lambda x: x.repeat_interleave(2, -1), lambda t: t[..., ::2],
                lambda w: w.repeat_interleave(2, 0), lambda t: t[::2]),
    "expanded": (lambda x: x[:1], lambda t: t.expand(6, 4, -1), lambda w: w, lambda t: t),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("movement", [False, True])
def test_non_contiguous_inputs(device, layout, movement):
    x0, w0, b0, s0, keep, mask = make((6, 4), 20, 9, device, torch.float32, seed=5)
    x_base, x_view, w_base, w_view = LAYOUTS[layout]
    xb, wb = x_base(x0), w_base(w0)
    assert not x_view(xb).is_contiguous()
    grad_out = torch.randn(4, 6, 9, device=device).transpose(0, 1)  # non-contiguous too

    x, w, s = leaves(xb, wb, s0)
    if movement:
        y = movement_linear(x_view(x), w_view(w), s, mask, b0)
    else:
        y = masked_linear(x_view(x), w_view(w), mask, b0)
    y.backward(grad_out)

    rx, rw = leaves(xb.double(), wb.double())
    wv = w_view(rw)
    y_ref = F.linear(x_view(rx), torch.where(keep, wv, torch.zeros_like(wv)), b0.double())
    y_ref.backward(grad_out.double())
    tol = tolerances(torch.float32)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), rx.grad, **tol)
    torch.testing.assert_close(w.grad.double(), rw.grad, **tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("movement", [False, True])
def test_non_contiguous_mask(device, movement):
    x0, w0, b0, s0, keep, mask = make((6,), 20, 9, device, torch.float32, seed=6)
    strided = mask.repeat_interleave(2, dim=0)[::2]  # the same bytes, every other row of a larger buffer
    assert not strided.is_contiguous() and torch.equal(strided, mask)
    outs = []
    for m in (mask, strided):
        x, w, s = leaves(x0, w0, s0)
        y = movement_linear(x, w, s, m, b0) if movement else masked_linear(x, w, m, b0)
        y.square().sum().backward()
        outs.append((y, x.grad, w.grad, s.grad))
    for a, b in zip(*outs):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("movement", [False, True])
def test_a_strided_mask_of_the_wrong_shape_is_reported_as_a_shape_error(device, movement):
    x, w, b, s, keep, mask = make((2,), 13, 6, device, torch.float32)
    wrong = mask.repeat(1, 3)[:, ::2]  # [6, 3] instead of [6, 2], and not contiguous
    assert not wrong.is_contiguous()
    for call in (lambda: movement_linear(x, w, s, wrong, b) if movement else masked_linear(x, w, wrong, b),
                 lambda: ops.movement_linear(x, w, s, wrong, b) if movement else ops.masked_linear(x, w, wrong, b, False)):
        with pytest.raises(RuntimeError, match=r"mask has shape \[6, 3\]"):
            call()


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    x0, w0, b0, _, keep, mask = make((0, 3), 10, 4, device, torch.float32)
    x, w, b = leaves(x0, w0, b0)
    y = masked_linear(x, w, mask, b)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all() and (b.grad == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n_in,n_out", [(0, 4), (5, 0)])
def test_zero_features(device, n_in, n_out):
    x0, w0, b0, s0, keep, mask = make((3,), n_in, n_out, device, torch.float32)
    x, w, s, b = leaves(x0, w0, s0, b0)
    y = movement_linear(x, w, s, mask, b)
    torch.testing.assert_close(y, b0.expand(3, n_out))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and s.grad.shape == s.shape


@pytest.mark.parametrize("device", devices())
def test_only_required_gradients(device):
    x0, w0, b0, s0, keep, mask = make((3,), 10, 4, device, torch.float32)
    x, = leaves(x0)
    masked_linear(x, w0, mask, b0).sum().backward()
    s, = leaves(s0)
    movement_linear(x0, w0, s, mask, b0).sum().backward()
    torch.testing.assert_close(s.grad.double(), reference_grads(x0, w0, keep, torch.ones(3, 4, device=device))[2])


# ---------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


def test_gradcheck_masked_linear():
    x, w, b, _, keep, mask = make((2, 3), 11, 5, "cpu", torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, mask, b), leaves(x, w, b))
    # weight_is_masked promises zeros at pruned positions, which perturbing W there would break:
    # keep the promise by masking inside the checked function.
    pre_masked = lambda w: torch.where(keep, w, torch.zeros_like(w))  # noqa: E731
    assert torch.autograd.gradcheck(
        lambda x, w, b: masked_linear(x, pre_masked(w), mask, b, weight_is_masked=True), leaves(x, w, b)
    )


def test_gradcheck_movement_linear_x_w_b():
    # grad_S is the straight-through estimate, not the true derivative (which is 0): the
    # numerical check covers x, W and b; grad_S is checked against G * W elsewhere.
    x, w, b, s, keep, mask = make((2, 3), 11, 5, "cpu", torch.float64)
    args = leaves(x, w, b)
    assert torch.autograd.gradcheck(lambda x, w, b: movement_linear(x, w, s, mask, b), args)


def opcheck_samples(device, dtype):
    x, w, b, s, keep, mask = make((2, 3), 13, 6, device, dtype)
    grad_out = torch.randn(2, 3, 6, device=device, dtype=dtype)
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (ops.masked_linear, (x, w, mask, b, False)),
        (ops.masked_linear, (rg(x), rg(w), mask, rg(b), False)),
        (ops.masked_linear, (rg(x), rg(torch.where(keep, w, torch.zeros_like(w))), mask, None, True)),
        (ops.movement_linear, (x, w, s, mask, b)),
        (ops.movement_linear, (rg(x), rg(w), rg(s), mask, rg(b))),
        (ops.masked_linear_grad_input, (grad_out, w, mask, False)),
        (ops.masked_linear_grad_input, (grad_out, w, mask, True)),
        (ops.masked_linear_grad_weight, (grad_out, x, mask)),
        (ops.movement_linear_grad_weight, (grad_out, x, w, mask)),
    ]


@pytest.mark.parametrize("device,dtype", [(d, torch.float32) for d in devices()] + [("cpu", torch.float64)])
@pytest.mark.parametrize("index", range(9))
def test_opcheck(device, dtype, index):
    op, args = opcheck_samples(device, dtype)[index]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    x0, w0, b0, s0, keep, mask = make((4, 3), 16, 8, "cpu", torch.float32)

    def fn(x, w, s, b):
        h = torch.relu(masked_linear(x, w, mask, b))
        return (movement_linear(x, w, s, mask, b) * h).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_args, compiled_args = leaves(x0, w0, s0, b0), leaves(x0, w0, s0, b0)
    fn(*eager_args).backward()
    compiled(*compiled_args).backward()
    for a, c in zip(eager_args, compiled_args):
        torch.testing.assert_close(c.grad, a.grad)

    explain = torch._dynamo.explain(fn)(*leaves(x0, w0, s0, b0))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_torch_compile_inductor():
    torch._dynamo.reset()
    x0, w0, b0, _, keep, mask = make((4, 3), 16, 8, "cpu", torch.float32)
    fn = lambda x, w, b: masked_linear(x, w, mask, b, weight_is_masked=False).square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    eager_args, compiled_args = leaves(x0, w0, b0), leaves(x0, w0, b0)
    fn(*eager_args).backward()
    compiled(*compiled_args).backward()
    for a, c in zip(eager_args, compiled_args):
        torch.testing.assert_close(c.grad, a.grad)


# ---------------------------------------------------------------------------------------
# Errors: raised before any work, inputs untouched


def error_cases(device):
    x, w, b, s, keep, mask = make((2, 3), 13, 6, device, torch.float32)
    go = torch.randn(2, 3, 6, device=device)
    return [
        ("x dtype", lambda: ops.masked_linear(x.double(), w, mask, b, False), "x has dtype"),
        ("weight 1-D", lambda: ops.masked_linear(x, w[0], mask[0], None, False), "weight must be 2-D"),
        ("x features", lambda: ops.masked_linear(x[..., :12], w, mask, b, False), "x has last dimension 12, expected in_features = 13"),
        ("x scalar", lambda: ops.masked_linear(x[0, 0, 0], w, mask, b, False), "x must have at least one dimension"),
        ("bias shape", lambda: ops.masked_linear(x, w, mask, b[:5], False), r"bias must have shape \[6\]"),
        ("bias dtype", lambda: ops.masked_linear(x, w, mask, b.double(), False), "bias has dtype"),
        ("mask dtype", lambda: ops.masked_linear(x, w, mask.bool(), b, False), "must be a bit-packed uint8 mask"),
        ("mask shape", lambda: ops.masked_linear(x, w, mask[:, :1].contiguous(), b, False), "mask has shape"),
        ("mask rows", lambda: ops.masked_linear(x, w, mask[:5], b, False), "mask has shape"),
        ("mask strides", lambda: ops.masked_linear(x, w, pack_mask(keep.repeat(1, 2)).to(device)[:, ::2], b, False), "mask must be contiguous"),
        ("int dtype", lambda: ops.masked_linear(x.int(), w.int(), mask, None, False), "weight must be float32"),
        ("scores shape", lambda: ops.movement_linear(x, w, s[:5], mask, b), "scores must have the shape of weight"),
        ("scores dtype", lambda: ops.movement_linear(x, w, s.double(), mask, b), "scores has dtype"),
        ("grad_input features", lambda: ops.masked_linear_grad_input(go[..., :5], w, mask, False), "grad_out has last dimension 5, expected out_features = 6"),
        ("grad_input dtype", lambda: ops.masked_linear_grad_input(go.double(), w, mask, False), "grad_out has dtype"),
        ("grad_weight leading", lambda: ops.masked_linear_grad_weight(go[:1], x, mask), "must agree in all but the last dimension"),
        ("grad_weight mask", lambda: ops.masked_linear_grad_weight(go, x, mask[:5]), "mask has shape"),
        ("grad_weight dtype", lambda: ops.masked_linear_grad_weight(go.double(), x, mask), "grad_out has dtype"),
        ("movement grad x", lambda: ops.movement_linear_grad_weight(go, x[..., :12], w, mask), "x has last dimension 12"),
        ("movement grad go", lambda: ops.movement_linear_grad_weight(go[..., :5], x, w, mask), "must agree in all but the last dimension|grad_out has last dimension"),
    ], (x, w, b, s, mask, go)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("index", range(20))
def test_errors_raise_and_leave_inputs_untouched(device, index):
    cases_, inputs = error_cases(device)
    _, call, match = cases_[index]
    before = [t.clone() for t in inputs]
    with pytest.raises(RuntimeError, match=match):
        call()
    for a, b in zip(before, inputs):
        assert torch.equal(a, b)


@requires_cuda
def test_cuda_device_mismatch_raises():
    x, w, b, _, keep, mask = make((4,), 16, 8, "cuda", torch.float32)
    with pytest.raises(RuntimeError, match="x is on"):
        ops.masked_linear(x.cpu(), w, mask, b, False)
    with pytest.raises(RuntimeError, match="mask is on"):
        ops.masked_linear(x, w, mask.cpu(), b, False)
    with pytest.raises(RuntimeError, match="bias is on"):
        ops.masked_linear(x, w, mask, b.cpu(), False)


LARGE_SHAPES = [(4096, 768, 3072), (300, 3072, 768), (1, 7, 1), (129, 65, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "device,m,k,n",
    # The BERT-sized products take minutes on the CPU harness: it runs the small ones.
    [(d, *s) for d in cuda_devices() for s in LARGE_SHAPES if not is_emulated(d) or s[0] * s[1] * s[2] < 10**7],
)
def test_cuda_large_shapes_against_cpu(device, dtype, m, k, n):
    x, w, b, _, keep, mask = make((m,), k, n, device, dtype, density=0.1)
    y = ops.masked_linear(x, w, mask, b, False)
    y_ref = reference(x, w, keep, b)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-1)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    go = torch.randn_like(y)
    gx = ops.masked_linear_grad_input(go, w, mask, False)
    torch.testing.assert_close(gx.double(), reference_grads(x, w, keep, go)[0], **tol)


@pytest.mark.parametrize("movement", [False, True])
def test_backward_saves_only_the_inputs(movement):
    # No weight-sized temporary (W * M) stays alive between forward and backward.
    x, w, b, s, keep, mask = make((4, 3), 16, 8, "cpu", torch.float32)
    x, w, s = leaves(x, w, s)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = movement_linear(x, w, s, mask, b) if movement else masked_linear(x, w, mask, b)
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), w.data_ptr(), mask.data_ptr()}
    y.sum().backward()
