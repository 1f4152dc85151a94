"""Every method through the trainer contract on a tiny BERT: exact sparsity, zeros stay zero, seeded
runs give identical masks, state for resume, recipes."""
import math

import pytest
import torch
from conftest import kept_oracle
from tinybert import batch, classifier, context, encoder, train
from transformers import BertForMaskedLM

from sparsebert.methods import METHODS, get_method, load_recipe, model_inputs
from sparsebert.methods.baselines import small_dense
from sparsebert.sparsity import masked_modules, sparsity_report

STEPS = 6

CASES = {
    "oneshot-magnitude": ("oneshot-magnitude", {}),
    "gradual-magnitude": ("gradual-magnitude", {}),
    "gradual-magnitude-nm": ("gradual-magnitude", {"pattern": "nm", "sparsity": 0.5, "pattern_kwargs": {"n": 2, "m": 4}}),
    "sparsebert-kap": ("sparsebert-kap", {}),
    "cap-movement": ("cap", {}),
    "cap-soft": ("cap", {"criterion": "soft-movement"}),
    "cap-structured": ("cap", {"pattern": "structured", "sparsity": 0.5}),
    "cap-magnitude-global": ("cap", {"criterion": "magnitude", "pattern": "global", "schedule": "cubic"}),
    "prune-ofa-downstream": ("prune-ofa", {"stage": "downstream"}),
    "prune-ofa-downstream-qat": ("prune-ofa", {"stage": "downstream", "quantize": True}),
}


def expected_kept(mods, sparsity, pattern="tensor"):
    if pattern == "global":
        n = sum(m.weight.numel() for m in mods.values())
        return kept_oracle(n, sparsity)
    return sum(kept_oracle(m.weight.numel(), sparsity) for m in mods.values())


def presparse(model, sparsity=0.8):
    """A 'sparse pre-trained' student for the downstream stage of Prune OFA."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layer." in name:
            m.weight.data[m.weight.abs() < m.weight.abs().flatten().kthvalue(int(sparsity * m.weight.numel())).values] = 0
    return model


def run(case, seed=0, check=None):
    name, kw = CASES[case]
    student = classifier(seed)
    if name == "prune-ofa":
        presparse(student)
    teacher = classifier(seed + 1).eval()
    pretrained = encoder(seed)
    method = get_method(name, **kw)
    torch.manual_seed(seed)
    logs = train(method, context(student, teacher, pretrained, total_steps=STEPS), STEPS, check=check)
    return method, student, logs


def zeros_stay_zero(method, step):
    for name, m in masked_modules(method.ctx.student).items():
        pruned = ~m.dense_mask()
        if m.scores is None or method.pruner.finalized:
            assert not (m.weight[pruned] != 0).any(), f"{name}: pruned weights moved at step {step}"
        if m.quantizer is not None:
            continue  # the output is fake-quantized; the weights check above covers it
        x = torch.randn(2, m.in_features)
        with torch.no_grad():  # pruned weights never reach the output
            torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight * ~pruned, m.bias))


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_reaches_exact_sparsity_and_keeps_zeros(case):
    method, student, logs = run(case, check=zeros_stay_zero)
    mods = masked_modules(student)
    name, kw = CASES[case]
    sparsity = kw.get("sparsity", 0.9)
    report = sparsity_report(student)
    if name == "prune-ofa":
        assert report["pruned"]["sparsity"] == pytest.approx(0.8, abs=0.01)  # the pattern it came with
    elif kw.get("pattern") == "structured":
        heads = student.config.num_attention_heads * student.config.num_hidden_layers
        assert report["pruned"]["nnz"] == method.pruner.nnz()
        q = [m for n, m in mods.items() if n.endswith("query")]
        kept_heads = sum(int(m.dense_mask().any(1).reshape(student.config.num_attention_heads, -1).any(1).sum()) for m in q)
        assert kept_heads == kept_oracle(heads, sparsity)
    elif kw.get("pattern") == "nm":
        assert report["pruned"]["sparsity"] == 0.5
    else:
        assert report["pruned"]["nnz"] == expected_kept(mods, sparsity, kw.get("pattern", "tensor"))
    assert all(math.isfinite(v) for info in logs for v in info.values())
    assert all(m.weight_is_masked for m in mods.values())


@pytest.mark.parametrize("case", ["gradual-magnitude", "cap-movement", "cap-soft"])
def test_seeded_runs_give_identical_masks(case):
    a = masked_modules(run(case, seed=3)[1])
    b = masked_modules(run(case, seed=3)[1])
    assert all(torch.equal(a[n].mask, b[n].mask) for n in a)


def test_every_cubic_event_is_exact():
    def check(method, step):
        t = step + 1
        if method.pruner.schedule.is_event(t):
            mods = masked_modules(method.ctx.student)
            assert method.pruner.nnz() == expected_kept(mods, method.pruner.schedule.value_at(t))
    run("gradual-magnitude", check=check)


def test_state_dict_resumes_pruner_and_banks():
    method, student, _ = run("cap-movement")
    state = method.state_dict()
    assert state["pruner.events"] > 0 and "contrastive.bank.pretrained.feats" in state
    fresh = get_method("cap")
    fresh.setup(context(classifier(), classifier(1).eval(), encoder(), total_steps=STEPS))
    fresh.load_state_dict(state)
    assert fresh.pruner.state_dict() == method.pruner.state_dict()
    assert torch.equal(fresh.contrastive.banks["finetuned"].feats, method.contrastive.banks["finetuned"].feats)
    assert fresh.pruner.finalized and not any(m.scores.requires_grad for m in fresh.pruner.modules)


def test_prune_ofa_upstream_mlm_and_representation():
    torch.manual_seed(0)
    from tinybert import config
    mlm = BertForMaskedLM(config())
    method = get_method("prune-ofa", stage="upstream", events=5)
    ctx = context(mlm, objective="mlm", total_steps=8)
    method.setup(ctx)
    opt = method.optimizer(1e-3, 0.01)
    for step in range(8):
        b = batch(step)
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, 1] = b["input_ids"][:, 1]
        b["labels"] = labels
        loss, info = method.training_loss(b, step)
        assert set(info) == {"task", "kd"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step)
    assert sparsity_report(mlm)["pruned"]["nnz"] == expected_kept(masked_modules(mlm), 0.9)
    assert method.lr_at(4, 1.0) == pytest.approx(1.0)  # rewound when pruning ended (step 4 of 8)
    rep = encoder()
    method = get_method("prune-ofa", stage="upstream")
    logs = train(method, context(rep, encoder(5).eval(), objective="representation", total_steps=6), 6, labels=False)
    assert set(logs[-1]) >= {"hidden", "attention"}
    assert sparsity_report(rep)["pruned"]["nnz"] == expected_kept(masked_modules(rep), 0.9)


def test_small_dense_keeps_every_kth_layer():
    model = classifier(num_hidden_layers=6)
    keep_ids = [id(layer) for layer in model.bert.encoder.layer]
    small_dense(model, num_layers=3)
    assert [id(layer) for layer in model.bert.encoder.layer] == [keep_ids[1], keep_ids[3], keep_ids[5]]
    assert model.config.num_hidden_layers == 3
    method = get_method("small-dense", sparsity=0.5)
    student = classifier(num_hidden_layers=6)
    train(method, context(student), 3)
    assert len(student.bert.encoder.layer) == 3


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="unknown options"):
        get_method("cap", sparsity_target=0.9)
    with pytest.raises(ValueError, match=r"unknown distill options \['hiden'\]"):
        get_method("sparsebert-kap", distill={"task": 0.0, "hiden": 1.0})
    with pytest.raises(ValueError, match=r"unknown contrastive options \['bank'\]"):
        get_method("cap", contrastive={"bank": 10})
    with pytest.raises(ValueError, match="distill must be a mapping"):
        get_method("cap", distill=0.5)
    with pytest.raises(ValueError, match="teacher"):
        get_method("sparsebert-kap").setup(context(classifier()))


@pytest.mark.parametrize("method,stage", [("dense", "teacher"), ("prune-ofa", "upstream"), ("prune-ofa", "downstream"),
                                          ("prune-ofa", "downstream-qat"), ("sparsebert-kap", "downstream"),
                                          ("cap", "downstream"), ("cap", "structured"), ("oneshot-magnitude", "downstream"),
                                          ("gradual-magnitude", "downstream"), ("small-dense", "downstream")])
def test_recipes_load_and_build(method, stage):
    recipe = load_recipe(method, stage)
    assert recipe["method"]["name"] == method
    assert {"epochs", "lr", "batch_size", "objective"} <= set(recipe["training"])
    kwargs = {k: v for k, v in recipe["method"].items() if k != "name"}
    assert type(get_method(method, **kwargs)) is METHODS[method]


def test_scores_train_at_their_own_lr():
    method = get_method("cap", score_lr=1e-2, contrastive=None, distill={"task": 1.0})
    method.setup(context(classifier(), total_steps=100))
    opt = method.optimizer(1e-5, 0.0)
    for group in opt.param_groups:
        group["lr"] = 1e-5  # what the trainer does
    module = method.pruner.modules[0]
    before_w, before_s = module.weight.detach().clone(), module.scores.detach().clone()
    loss, _ = method.training_loss(batch(0), 0)
    loss.backward()
    opt.step()
    # Adam's first step moves a parameter by at most its LR (about the LR where |grad| >> eps)
    assert 5e-3 < (module.scores - before_s).abs().max().item() <= 1e-2 * (1 + 1e-5)
    assert 5e-6 < (module.weight - before_w).abs().max().item() <= 1e-5 * (1 + 1e-5)
    assert opt.param_groups[-1]["lr"] == 1e-5  # restored after the step


@pytest.mark.parametrize("name, objective", [("cap", "mlm"), ("sparsebert-kap", "representation"),
                                             ("small-dense", "mlm"), ("dense", "representation")])
def test_method_refuses_an_objective_it_cannot_train(name, objective):
    from sparsebert.methods import MethodContext, get_method

    ctx = MethodContext(student=torch.nn.Linear(2, 2), teacher=None, pretrained=None, objective=objective,
                        num_labels=0, total_steps=1, steps_per_epoch=1, train_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=f"cannot train objective '{objective}'"):
        get_method(name).setup(ctx)


def test_magnitude_score_init_makes_the_first_mask_a_magnitude_mask():
    method = get_method("cap", score_init="magnitude", schedule="one-shot", sparsity=0.7, contrastive=None,
                        distill={"task": 1.0})
    student = classifier()
    method.setup(context(student))
    for module in masked_modules(student).values():
        assert torch.equal(module.scores, module.weight.abs())  # movement keeps pruned weights
        w = module.weight.detach().abs().flatten()
        k = kept_oracle(w.numel(), 0.7)
        assert torch.equal(module.dense_mask().flatten(), w >= w.topk(k).values.min())


def test_score_init_is_checked():
    with pytest.raises(ValueError, match="score_init must be one of"):
        get_method("cap", score_init="ones")
    with pytest.raises(ValueError, match="needs a movement criterion"):
        get_method("gradual-magnitude", score_init="magnitude")


def test_lr_scales_give_matching_parameters_their_own_lr():
    method = get_method("oneshot-magnitude", sparsity=0.5, lr_scales={r"embeddings\.": 0.1, "classifier": 2.0})
    student = classifier()
    method.setup(context(student))
    opt = method.optimizer(1e-3, 0.01)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    for name, param in student.named_parameters():
        scale = 0.1 if "embeddings." in name else 2.0 if "classifier" in name else 1.0
        assert scale_of[id(param)] == (scale, 0.01 if param.dim() >= 2 else 0.0), name
    emb, enc = student.bert.embeddings.word_embeddings.weight, student.bert.encoder.layer[0].output.dense.bias
    before = emb.detach().clone(), enc.detach().clone()
    for group in opt.param_groups:
        group["lr"] = 1e-3
    method.training_loss(batch(0), 0)[0].backward()
    opt.step()
    # Adam's first step moves a parameter by about its LR where the gradient is not tiny (plus a
    # decoupled decay of lr * 0.01 * |w|, under 1e-3 of the LR for these small weights)
    assert 0.5e-4 < (emb - before[0]).abs().max().item() <= 1e-4 * (1 + 1e-3)
    assert 0.5e-3 < (enc - before[1]).abs().max().item() <= 1e-3 * (1 + 1e-3)


@pytest.mark.parametrize("spec, message", [({"a(": 1.0}, "bad regex"), ({"x": 0}, "positive number"),
                                           ({"x": "y"}, "positive number"), ({"x": float("nan")}, "positive number"),
                                           ([1.0], "must map")])
def test_lr_scales_are_checked(spec, message):
    with pytest.raises(ValueError, match=message):
        get_method("gradual-magnitude", lr_scales=spec)


def test_cap_without_batch_index_says_what_it_needs():
    method = get_method("cap")
    method.setup(context(classifier(0), classifier(1).eval(), encoder(0)))
    b = batch(0)
    del b["index"]
    with pytest.raises(ValueError, match=r"needs batch\['index'\]: the index of each example in the training set, "
                                         r"in \[0, 16\)"):
        method.training_loss(b, 0)


@pytest.mark.parametrize("case", ["sparsebert-kap", "cap-movement", "oneshot-magnitude"])
def test_loss_from_outputs_of_the_callers_forward_is_the_training_loss(case):
    name, kw = CASES[case]
    losses = []
    for own_forward in (True, False):
        method = get_method(name, **kw)
        student = classifier(0)
        method.setup(context(student, classifier(1).eval(), encoder(0)))
        b = batch(0)
        if own_forward:
            losses.append(method.training_loss(b, 0)[0])
        else:
            losses.append(method.loss_from_outputs(b, student(**model_inputs(b), **method.forward_kwargs()), 0)[0])
    assert torch.equal(*losses)
