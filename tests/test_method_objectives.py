"""Every method trains every objective it accepts: the output head gets a gradient (regression
included, where KL and soft cross-entropy of one logit are identically 0), or setup() refuses."""
import pytest
import torch
from transformers import BertForMaskedLM

from sparsebert.methods import METHODS, MethodContext, get_method
from sparsebert.objectives import model_inputs
from tinybert import batch, classifier, config

KW = {"prune-ofa": [{"stage": "upstream"}, {"stage": "downstream"}], "small-dense": [{"num_layers": 1}]}


def model_for(objective: str, seed: int):
    if objective == "classification":
        return classifier(seed)
    if objective == "regression":
        return classifier(seed, num_labels=1, problem_type="regression")
    torch.manual_seed(seed)
    return BertForMaskedLM(config())


def head(model, objective):
    return model.classifier.weight if objective in ("classification", "regression") else model.cls.predictions.transform.dense.weight


def task_batch(objective: str) -> dict:
    b = batch(0, train_size=16)
    if objective == "regression":
        b["labels"] = torch.rand(4) * 5
    if objective == "mlm":
        b["labels"] = torch.where(torch.rand(b["input_ids"].shape, generator=torch.Generator().manual_seed(1)) < 0.3,
                                  b["input_ids"], torch.full_like(b["input_ids"], -100))
        b["labels"][:, 0] = b["input_ids"][:, 0]
    return b


CASES = [(name, kw, objective) for name in METHODS for kw in KW.get(name, [{}])
         for objective in ("classification", "regression", "mlm")]


@pytest.mark.parametrize("name,kw,objective", CASES, ids=[f"{n}-{k.get('stage', '')}-{o}" for n, k, o in CASES])
def test_the_output_head_learns_or_setup_refuses(name, kw, objective):
    method = get_method(name, **kw)
    student, teacher = model_for(objective, 0), model_for(objective, 1).eval().requires_grad_(False)
    ctx = MethodContext(student=student, teacher=teacher, pretrained=model_for("classification", 2).bert.eval(),
                        objective=objective, num_labels={"classification": 2, "regression": 1}.get(objective, 0),
                        total_steps=10, steps_per_epoch=4, train_size=16, device=torch.device("cpu"))
    if objective not in type(method).objectives:
        with pytest.raises(ValueError, match=f"cannot train objective {objective!r}"):
            method.setup(ctx)
        return
    method.setup(ctx)
    loss, logs = method.training_loss(task_batch(objective), 0)
    assert torch.isfinite(loss)
    loss.backward()
    grad = head(student, objective).grad
    assert grad is not None and grad.abs().sum() > 0, (name, kw, objective, logs)


def test_regression_distils_the_teachers_prediction():
    method = get_method("sparsebert-kap")
    student = classifier(0, num_labels=1, problem_type="regression")
    teacher = classifier(1, num_labels=1, problem_type="regression").eval().requires_grad_(False)
    method.setup(MethodContext(student=student, teacher=teacher, pretrained=None, objective="regression", num_labels=1,
                               total_steps=10, steps_per_epoch=4, train_size=16, device=torch.device("cpu")))
    b = task_batch("regression")
    _, logs = method.training_loss(b, 0)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(student(**model_inputs(b)).logits, teacher(**model_inputs(b)).logits)
    assert logs["kd"] == pytest.approx(expected.item(), rel=1e-5) and logs["kd"] > 0

