"""sparsebert.Pruning in a plain PyTorch loop: every method adopted with its few lines gives exactly
what the method gives through the trainer contract (tinybert.train), keeps its sparsity exact and
its pruned weights at 0; optimizers are turned masked; recipes; checkpoints."""
import copy
import warnings

import pytest
import torch
from conftest import kept_oracle
from tinybert import batch, classifier, context, encoder, train

import sparsebert
from sparsebert.methods import get_method, model_inputs
from sparsebert.optim import MaskedAdamW, MaskedSGD
from sparsebert.sparsity import masked_modules
from sparsebert.zeros import UnmaskedOptimizerWarning

STEPS = 6
LR = 1e-3

CASES = {
    "gradual-magnitude": {},
    "oneshot-magnitude": {},
    "sparsebert-kap": {},
    "cap": {},
    "prune-ofa-downstream": {"stage": "downstream"},
}


def presparse(model, sparsity=0.8):
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layer." in name:
            w = m.weight.data
            w[w.abs() < w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    return model


def models(case):
    student = classifier(0)
    if case.startswith("prune-ofa"):
        presparse(student)
    return student, classifier(1).eval(), encoder(0)


def user_loop(pruning, model, optimizer, scheduler, steps=STEPS, first=0):
    """A user's loop: their forward (with labels, so the model computes its own loss), the method's
    loss only where it adds terms, their backward and optimizer step, then pruning.step()."""
    for step in range(first, steps):
        b = batch(step)
        outputs = model(**model_inputs(b), labels=b["labels"])
        loss = pruning.loss(b, outputs) if pruning.method.adds_loss_terms else outputs.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        pruning.step()


def revived(model):
    return sum(int(((m.weight != 0) & ~m.dense_mask()).sum()) for m in masked_modules(model).values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_plain_loop_adopts_every_method_and_matches_the_method_itself(case):
    name = case.removesuffix("-downstream")
    student, teacher, pretrained = models(case)
    reference = copy.deepcopy(student)
    torch.manual_seed(0)
    train(get_method(name, **CASES[case]), context(reference, teacher, pretrained, total_steps=STEPS), STEPS, lr=LR)

    pruning = sparsebert.Pruning(name, teacher=teacher, pretrained=pretrained, total_steps=STEPS, train_size=16,
                                 **CASES[case])
    model, optimizer = pruning.prepare(student, lr=LR, weight_decay=0.01)
    torch.manual_seed(0)
    user_loop(pruning, model, optimizer, pruning.lr_scheduler())

    got, want = masked_modules(model), masked_modules(reference)
    assert got.keys() == want.keys()
    for n in got:
        assert torch.equal(got[n].mask, want[n].mask), n
        assert torch.equal(got[n].weight, want[n].weight), n
    assert revived(model) == 0
    nnz = pruning.report()["pruned"]["nnz"]
    if case.startswith("prune-ofa"):
        assert nnz == sum(int((m.weight != 0).sum()) for m in masked_modules(model).values())
    else:
        assert nnz == sum(kept_oracle(m.weight.numel(), 0.9) for m in got.values())
    assert pruning.step_count == STEPS and pruning.method.adds_loss_terms == (case not in ("gradual-magnitude",
                                                                                            "oneshot-magnitude"))


def test_a_method_with_loss_terms_refuses_a_step_without_its_loss():
    student, teacher, _ = models("sparsebert-kap")
    pruning = sparsebert.Pruning("sparsebert-kap", teacher=teacher, total_steps=STEPS)
    model, optimizer = pruning.prepare(student, lr=LR)
    b = batch(0)
    model(**model_inputs(b), labels=b["labels"]).loss.backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"pruning.loss\(batch, outputs\)"):
        pruning.step()


def test_the_forward_returns_what_the_loss_reads_only_while_training():
    student, teacher, _ = models("sparsebert-kap")
    pruning = sparsebert.Pruning("sparsebert-kap", teacher=teacher, total_steps=STEPS)
    model, _ = pruning.prepare(student, lr=LR)
    inputs = model_inputs(batch(0))
    out = model(**inputs)
    assert out.hidden_states is not None and out.attentions is not None
    model.eval()
    assert model(**inputs).hidden_states is None
    model.train()
    pruning.close()
    assert model(**inputs).hidden_states is None


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_prepare_turns_a_fresh_torch_optimizer_into_its_masked_twin(kind):
    student, teacher, pretrained = models("cap")
    groups = [{"params": [p for n, p in student.named_parameters() if "bias" not in n]},
              {"params": [p for n, p in student.named_parameters() if "bias" in n], "weight_decay": 0.0}]
    user = (torch.optim.AdamW(groups, lr=3e-4, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05) if kind == "adamw" else
            torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05))
    pruning = sparsebert.Pruning("gradual-magnitude" if kind == "sgd" else "cap", teacher=teacher,
                                 pretrained=pretrained, total_steps=STEPS, train_size=16)
    model, optimizer = pruning.prepare(student, user)
    assert type(optimizer) is (MaskedAdamW if kind == "adamw" else MaskedSGD)
    for mine, theirs in zip(optimizer.param_groups, user.param_groups):
        assert mine["params"] == theirs["params"]
        for key in ("lr", "weight_decay", "maximize") + (("betas", "eps") if kind == "adamw" else ("momentum", "nesterov")):
            assert mine[key] == theirs[key], key
    if kind == "adamw":  # movement scores (CAP) join in their own group at the method's score LR
        scores = [m.scores for m in masked_modules(model).values()]
        assert len(optimizer.param_groups) == 3 and optimizer.param_groups[2]["params"] == scores
        assert optimizer.param_groups[2]["lr"] == pruning.method.config["score_lr"]
    else:  # magnitude weights are stepped with their masks
        assert all(optimizer.mask_of(m.weight) is m.mask for m in masked_modules(model).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmaskedOptimizerWarning)
        user_loop(pruning, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    assert revived(model) == 0 or kind == "adamw"  # movement keeps pruned weights until the end
    assert pruning.report()["pruned"]["nnz"] == sum(kept_oracle(m.weight.numel(), 0.9)
                                                    for m in masked_modules(model).values())


def test_another_optimizer_is_kept_and_its_revivals_undone_with_one_warning():
    student, _, _ = models("gradual-magnitude")
    user = torch.optim.Adagrad(student.parameters(), lr=0.05)
    pruning = sparsebert.Pruning("gradual-magnitude", total_steps=STEPS)
    model, optimizer = pruning.prepare(student, user)
    assert optimizer is user
    with pytest.warns(UnmaskedOptimizerWarning, match="MaskedAdamW") as caught:
        user_loop(pruning, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    assert len([w for w in caught if w.category is UnmaskedOptimizerWarning]) == 1
    assert revived(model) == 0


def test_recipes_files_shipped_and_dicts_with_overrides(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("method:\n  name: sparsebert-kap\n  sparsity: 0.8\n  distill: {logits: 2.0, hidden: 0.0}\n")
    teacher = classifier(1)
    from_file = sparsebert.Pruning.from_recipe(recipe, teacher=teacher, distill={"attention": 0.5})
    assert from_file.method.config["sparsity"] == 0.8
    d = from_file.method.distill
    assert (d.logits, d.hidden, d.attention) == (2.0, 0.0, 0.5)
    shipped = sparsebert.Pruning.from_recipe("sparsebert-kap/downstream", teacher=teacher, sparsity=0.95)
    assert shipped.method.name == "sparsebert-kap" and shipped.method.config["sparsity"] == 0.95
    as_dict = sparsebert.Pruning.from_recipe({"method": {"name": "oneshot-magnitude", "sparsity": 0.5}})
    assert as_dict.method.config["sparsity"] == 0.5
    with pytest.raises(FileNotFoundError, match="no recipe file"):
        sparsebert.Pruning.from_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown options"):
        sparsebert.Pruning.from_recipe(recipe, teacher=teacher, sparsty=0.5)


def test_missing_models_and_sizes_are_refused_before_anything_changes():
    with pytest.raises(ValueError, match="pretrained and teacher model: pass pretrained= and teacher="):
        sparsebert.Pruning("cap")
    student = classifier(0)
    before = copy.deepcopy(student.state_dict())
    pruning = sparsebert.Pruning("cap", teacher=classifier(1), pretrained=encoder(0), total_steps=STEPS)
    with pytest.raises(ValueError, match="train_size=len"):
        pruning.prepare(student, lr=LR)
    with pytest.raises(ValueError, match="needs total_steps"):
        sparsebert.Pruning("gradual-magnitude").prepare(student, lr=LR)
    with pytest.raises(RuntimeError, match="call prepare"):
        sparsebert.Pruning("gradual-magnitude").step()
    assert masked_modules(student) == {}
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_state_dict_resumes_a_loop_exactly():
    student, teacher, pretrained = models("cap")
    whole = copy.deepcopy(student)

    def start(model, resume=None, model_state=None):
        pruning = sparsebert.Pruning("cap", teacher=teacher, pretrained=pretrained, total_steps=STEPS, train_size=16)
        if model_state is not None:
            pruning.adapt(model)
            model.load_state_dict(model_state)
        model, optimizer = pruning.prepare(model, lr=LR, resume=resume)
        return pruning, optimizer, pruning.lr_scheduler()

    pruning, optimizer, scheduler = start(whole)
    user_loop(pruning, whole, optimizer, scheduler)

    pruning, optimizer, scheduler = start(student)
    user_loop(pruning, student, optimizer, scheduler, steps=3)
    saved = copy.deepcopy((student.state_dict(), pruning.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    fresh = classifier(0)
    pruning, optimizer, scheduler = start(fresh, resume=saved[1], model_state=saved[0])
    optimizer.load_state_dict(saved[2])
    scheduler.load_state_dict(saved[3])
    user_loop(pruning, fresh, optimizer, scheduler, first=3)
    got, want = masked_modules(fresh), masked_modules(whole)
    for n in got:
        assert torch.equal(got[n].mask, want[n].mask) and torch.equal(got[n].weight, want[n].weight), n
        assert torch.equal(got[n].scores, want[n].scores), n
