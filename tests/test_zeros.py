"""No silent revival: whatever steps a pruned model, pruned weights never reach its outputs or its
exported weights, and an optimizer without the masks is told once (sparsebert.zeros)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from tinybert import batch, classifier, context

from sparsebert.methods import get_method
from sparsebert.optim import MaskedAdamW, MaskedSGD
from sparsebert.sparsity import MaskedLinear, export_dense, masked_modules
from sparsebert.zeros import UnmaskedOptimizerWarning

STEPS = 8

OPTIMIZERS = {
    "torch-adamw": lambda model, method: torch.optim.AdamW(model.parameters(), lr=1e-2),
    "torch-sgd": lambda model, method: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    "maskedadamw-without-masks": lambda model, method: MaskedAdamW(model.parameters(), lr=1e-2),
    "method-maskedadamw": lambda model, method: method.optimizer(1e-2, 0.01),
    "maskedsgd-with-masks": lambda model, method: MaskedSGD(
        model.parameters(), lr=0.1, masks={m.weight: m.mask for m in masked_modules(model).values()}),
}
MASKED = {"method-maskedadamw", "maskedsgd-with-masks"}


def revived(model) -> int:
    return sum(int(((m.weight != 0) & ~m.dense_mask()).sum()) for m in masked_modules(model).values())


def outputs_ignore_pruned_weights(model) -> None:
    for m in masked_modules(model).values():
        x = torch.randn(3, m.in_features, dtype=m.weight.dtype)
        with torch.no_grad():
            torch.testing.assert_close(m(x), F.linear(x, m.weight * m.dense_mask(), m.bias))


def train(kind, schedule="cubic"):
    model = classifier(0)
    method = get_method("gradual-magnitude", sparsity=0.9, schedule=schedule, end_frac=0.5, events=4)
    method.setup(context(model, total_steps=STEPS))
    opt = OPTIMIZERS[kind](model, method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            loss, _ = method.training_loss(batch(step), step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(step)
            assert revived(model) == 0, f"step {step}: pruned weights revived"
            outputs_ignore_pruned_weights(model)
    return model, [w for w in caught if issubclass(w.category, UnmaskedOptimizerWarning)]


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_no_optimizer_revives_pruned_weights(kind):
    model, warned = train(kind)
    assert all(m.weight_is_masked for m in masked_modules(model).values())  # the fast forward is back
    if kind in MASKED:
        assert warned == []
    else:
        assert len(warned) == 1, [str(w.message) for w in warned]
        message = str(warned[0].message)
        assert "MaskedAdamW" in message and type(OPTIMIZERS[kind](model, None)).__name__ in message
        assert warned[0].filename == __file__  # points at the caller's optimizer.step()


def test_a_change_outside_any_optimizer_voids_the_promise(tmp_path):
    model, _ = train("method-maskedadamw", schedule="one-shot")
    module = next(iter(masked_modules(model).values()))
    assert module.weight_is_masked
    with torch.no_grad():
        module.weight.add_(1.0)  # every pruned weight non-zero now
    assert not module.weight_is_masked
    outputs_ignore_pruned_weights(model)
    path = export_dense(model, tmp_path / "plain")
    from transformers import BertForSequenceClassification
    plain = BertForSequenceClassification.from_pretrained(path)
    name = next(iter(masked_modules(model)))
    torch.testing.assert_close(plain.get_submodule(name).weight, module.weight * module.dense_mask())


def test_load_state_dict_voids_and_a_masked_step_renews():
    model, _ = train("method-maskedadamw")
    module = next(iter(masked_modules(model).values()))
    module.load_state_dict(module.state_dict())
    assert not module.weight_is_masked  # loaded values are not known to be zero
    module.rezero_()
    assert module.weight_is_masked


def test_conversions_and_copies_keep_the_zeros_right():
    model, _ = train("method-maskedadamw", schedule="one-shot")
    model.double()
    assert all(m.weight_is_masked for m in masked_modules(model).values())  # .to() keeps zeros at zero
    twin = copy.deepcopy(model)
    outputs_ignore_pruned_weights(twin)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    with pytest.warns(UnmaskedOptimizerWarning):
        loss = twin(**{k: v for k, v in batch(0).items() if k != "index"}).loss
        loss.backward()
        opt.step()
    assert revived(twin) == 0 and revived(model) == 0


def test_torch_compile_forward_masks_the_product():
    module = MaskedLinear(16, 8)
    module.mask.copy_(torch.ops.sparsebert.nm_mask(module.weight.detach(), 2, 4, True))
    module.rezero_()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 16)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), F.linear(x, module.weight * module.dense_mask(), module.bias))
        with torch.no_grad():
            module.weight.add_(1.0)  # the weight changed: only the masked product is right
