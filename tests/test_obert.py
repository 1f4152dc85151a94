"""The oBERT criterion: the block Fisher against explicit matrices, its OBS ranking and weight update
against a dense reference, the optimal-brain-surgeon property, and the criterion inside a method (exact
sparsity, gradients seen, a loop's exact resume, bad options)."""
import copy

import pytest
import torch
from conftest import kept_oracle
from tinybert import batch, classifier, context, train

import sparsebert
from sparsebert.methods import get_method, model_inputs
from sparsebert.sparsity import masked_modules
from sparsebert.sparsity.fisher import BlockFisher
from sparsebert.sparsity.modules import MaskedLinear
from sparsebert.sparsity.pruner import Pruner


def reference_fisher(grads, rows, cols, block, grads_horizon, damp):
    """Per row, the dense (cols, cols) block-diagonal damped Fisher, from the gradient list."""
    beta = 1 - 1 / grads_horizon
    n = len(grads)
    weights = [(1 - beta) * beta ** (n - 1 - i) / (1 - beta ** n) for i in range(n)]
    fisher = torch.zeros(rows, cols, cols, dtype=torch.float64)
    for w, g in zip(weights, grads):
        g = g.double()
        fisher += w * g[:, :, None] * g[:, None, :]
    keep = torch.zeros(cols, cols, dtype=torch.bool)
    for start in range(0, cols, block):
        keep[start:start + block, start:start + block] = True
    fisher *= keep
    nb = -(-cols // block)
    scale = fisher.diagonal(dim1=1, dim2=2).sum() / (rows * nb * block)  # padding lanes count in the mean
    return fisher + damp * scale * torch.eye(cols, dtype=torch.float64)


@pytest.mark.parametrize("rows,cols,block", [(3, 10, 4), (2, 8, 8), (5, 7, 1), (4, 12, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fold,n", [(1, 6), (4, 6), (8, 6), (3, 9)])  # held at the read, folded before, both
def test_block_fisher_inverse_matches_the_dense_damped_matrix(rows, cols, block, dtype, fold, n):
    g = torch.Generator().manual_seed(rows * cols + block)
    grads = [torch.randn(rows, cols, generator=g).to(dtype) for _ in range(n)]
    fisher = BlockFisher(rows, cols, block=block, grads=3, damp=0.05, fold=fold)
    for grad in grads:
        fisher.add(grad)
    want = torch.linalg.inv(reference_fisher(grads, rows, cols, block, 3, 0.05))
    torch.testing.assert_close(fisher.diag().double(), want.diagonal(dim1=1, dim2=2), rtol=2e-4, atol=0)
    weight = torch.randn(rows, cols, generator=g)
    torch.testing.assert_close(fisher.saliency(weight).double(),
                               weight.double() ** 2 / (2 * want.diagonal(dim1=1, dim2=2)), rtol=2e-4, atol=0)


def test_held_gradients_survive_a_state_round_trip_to_the_same_fisher():
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(4, 9, generator=g) for _ in range(11)]
    whole, part = BlockFisher(4, 9, block=4, fold=4), BlockFisher(4, 9, block=4, fold=4)
    for grad in grads:
        whole.add(grad)
    for grad in grads[:6]:
        part.add(grad)
    state = copy.deepcopy(part.state_dict())
    assert state["held"].shape == (12, 2, 4)
    resumed = BlockFisher(4, 9, block=4, fold=4)
    resumed.load_state_dict(state)
    for grad in grads[6:]:
        resumed.add(grad)
    assert torch.equal(resumed.inverse(), whole.inverse())
    with pytest.raises(ValueError, match="2 held Fisher gradients .* do not fit .*fold=1"):
        BlockFisher(4, 9, block=4, fold=1).load_state_dict(state)


def test_before_any_gradient_the_ranking_is_magnitude():
    fisher = BlockFisher(3, 5, block=2)
    weight = torch.randn(3, 5)
    assert torch.equal(fisher.saliency(weight), weight ** 2 / 2)


def test_obs_update_is_the_optimal_brain_surgeon_for_one_weight():
    """Pruning weight q alone: among all moves that zero it, -F^-1 e_q w_q / [F^-1]_qq has the least
    quadratic loss 1/2 d^T F d, and that loss is the saliency."""
    g = torch.Generator().manual_seed(1)
    cols, q = 6, 2
    fisher = BlockFisher(1, cols, block=cols, grads=4, damp=0.1)
    for _ in range(8):
        fisher.add(torch.randn(1, cols, generator=g, dtype=torch.float64))
    dense = torch.linalg.inv(fisher.inverse()[0].double())
    weight = torch.randn(1, cols, generator=g)
    moved = weight.clone()
    pruned = torch.zeros(1, cols, dtype=torch.bool)
    pruned[0, q] = True
    fisher.compensate_(moved, pruned)
    d = (moved - weight).double()[0]
    assert abs(float(moved[0, q])) < 1e-5
    cost = 0.5 * d @ dense @ d
    torch.testing.assert_close(cost, fisher.saliency(weight)[0, q].double(), rtol=1e-4, atol=0)
    for _ in range(20):  # any other move that zeros w_q costs more
        other = d + torch.randn(cols, generator=g, dtype=torch.float64) * 0.1
        other[q] = d[q]
        assert 0.5 * other @ dense @ other > cost


def test_an_event_ranks_by_saliency_and_moves_the_kept_weights():
    torch.manual_seed(0)
    module = MaskedLinear(12, 4, bias=False)
    pruner = Pruner({"m": module}, "obert", "tensor", None, criterion_kwargs={"block": 4, "grads": 2, "damp": 0.1})
    grads = [torch.randn(4, 12) for _ in range(3)]
    for grad in grads:
        module.weight.grad = grad.clone()
        pruner.observe()
    weight = module.weight.detach().clone()
    inverse = torch.linalg.inv(reference_fisher(grads, 4, 12, 4, 2, 0.1))
    diag = inverse.diagonal(dim1=1, dim2=2)
    saliency = weight.double() ** 2 / (2 * diag)
    keep = kept_oracle(48, 0.75)
    assert pruner.prune(0.75)["sparsity"] == 1 - keep / 48
    want_mask = torch.zeros(48, dtype=torch.bool)
    want_mask[saliency.flatten().topk(keep).indices] = True
    want_mask = want_mask.view(4, 12)
    assert torch.equal(module.dense_mask(), want_mask)
    v = torch.where(want_mask, 0.0, weight.double() / diag)
    want = (weight.double() - torch.einsum("rij,rj->ri", inverse, v)) * want_mask
    torch.testing.assert_close(module.weight.detach().double(), want, rtol=1e-4, atol=1e-6)
    assert module.weight_is_masked


def kap_obert(**options):
    return get_method("sparsebert-kap", criterion="obert", criterion_kwargs={"block": 8, "grads": 4}, events=4,
                      **options)


def test_kap_with_obert_prunes_exactly_sees_every_gradient_and_differs_from_magnitude():
    teacher = classifier(1).eval()
    student, reference = classifier(0), classifier(0)
    method = kap_obert()
    seen = []
    add = BlockFisher.add
    BlockFisher.add = lambda self, grad: (seen.append(1), add(self, grad))[1]
    try:
        train(method, context(student, teacher, total_steps=10), 10)
    finally:
        BlockFisher.add = add
    end = method.pruner.schedule.end
    assert len(seen) == end * len(method.pruner.modules)  # every step before the last event, every matrix
    assert method.pruner.grad_stats is None and "stats" not in method.state_dict()  # released after it
    train(get_method("sparsebert-kap", events=4), context(reference, teacher, total_steps=10), 10)
    got, magnitude = masked_modules(student), masked_modules(reference)
    assert sum(int(m.mask.ne(magnitude[n].mask).sum()) for n, m in got.items()) > 0
    for m in got.values():
        assert m.nnz() == kept_oracle(m.weight.numel(), 0.9)
        assert int(((m.weight != 0) & ~m.dense_mask()).sum()) == 0


def test_a_loop_resumes_exactly_with_the_fisher_in_the_state():
    teacher = classifier(1).eval()
    steps, cut = 8, 3

    def start(model, resume=None, model_state=None):
        pruning = sparsebert.Pruning(kap_obert(), teacher=teacher, total_steps=steps)
        if model_state is not None:
            pruning.adapt(model)
            model.load_state_dict(model_state)
        model, optimizer = pruning.prepare(model, lr=1e-3, resume=resume)
        return pruning, optimizer

    def loop(pruning, model, optimizer, first, last):
        for step in range(first, last):
            b = batch(step)
            loss = pruning.loss(b, model(**model_inputs(b)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruning.step()

    whole = classifier(0)
    pruning, optimizer = start(whole)
    loop(pruning, whole, optimizer, 0, steps)

    part = classifier(0)
    pruning, optimizer = start(part)
    loop(pruning, part, optimizer, 0, cut)
    state = pruning.state_dict()
    assert len(state["method"]["pruner.stats"]) == len(masked_modules(part))
    saved = copy.deepcopy((part.state_dict(), state, optimizer.state_dict()))
    fresh = classifier(0)
    pruning, optimizer = start(fresh, resume=saved[1], model_state=saved[0])
    optimizer.load_state_dict(saved[2])
    loop(pruning, fresh, optimizer, cut, steps)
    got, want = masked_modules(fresh), masked_modules(whole)
    for n in got:
        assert torch.equal(got[n].mask, want[n].mask) and torch.equal(got[n].weight, want[n].weight), n


def test_resuming_before_the_last_event_without_the_fisher_is_refused():
    method = kap_obert()
    method.setup(context(classifier(0), classifier(1).eval(), total_steps=10))
    state = {k: v for k, v in method.state_dict().items() if k != "pruner.stats"}
    with pytest.raises(ValueError, match="needs its gradient statistics to resume"):
        method.load_state_dict(state)


@pytest.mark.parametrize("options,message", [
    ({"criterion_kwargs": {"blok": 8}}, "bad criterion_kwargs: .*'blok'"),
    ({"criterion_kwargs": {"block": 0}}, "block, grads and fold must be at least 1"),
    ({"criterion_kwargs": {"fold": 0}}, "block, grads and fold must be at least 1"),
    ({"criterion_kwargs": {"damp": 0.0}}, "damp must be positive"),
])
def test_bad_options_are_refused_when_the_method_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("gradual-magnitude", criterion="obert", **options)


def test_criterion_kwargs_for_a_criterion_without_options_are_refused():
    with pytest.raises(ValueError, match="'magnitude' takes no criterion_kwargs"):
        get_method("gradual-magnitude", criterion_kwargs={"block": 8})
