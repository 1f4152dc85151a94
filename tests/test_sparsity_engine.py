"""sparsify, MaskedLinear, the pruner (exact sparsity per event), pattern lock, reports, QAT."""
import math

import pytest
import torch
from conftest import kept_oracle
from tinybert import batch, classifier, encoder

import sparsebert
from sparsebert.ops import pack_mask
from sparsebert.sparsity import (Cubic, MaskedLinear, Pruner, enable_qat, fake_quantize, lock, masked_modules,
                                 sparsify, sparsity_report)


def inputs(step=0):
    b = batch(step)
    return {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_default_targets_are_the_six_encoder_matrices():
    model = classifier()
    mods = sparsebert.sparsify(model)
    suffixes = {n.split("layer.0.")[-1] for n in mods if "layer.0." in n}
    assert suffixes == {"attention.self.query", "attention.self.key", "attention.self.value",
                        "attention.output.dense", "intermediate.dense", "output.dense"}
    assert len(mods) == 12
    assert not isinstance(model.bert.pooler.dense, MaskedLinear) and not isinstance(model.classifier, MaskedLinear)


def test_pooler_and_classifier_on_request():
    model = classifier()
    mods = sparsify(model, {"include": [r"pooler\.dense$", r"^classifier$"]})
    assert set(mods) == {"bert.pooler.dense", "classifier"}


def test_full_mask_keeps_outputs_and_extras():
    model = classifier().eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(**inputs(), output_hidden_states=True, output_attentions=True)
    weights = {n: p for n, p in model.named_parameters()}
    sparsify(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == weights.keys()  # Parameters shared, not copied
    with torch.no_grad():
        out = model(**inputs(), output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(out.logits, ref.logits)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    torch.testing.assert_close(out.attentions[1], ref.attentions[1])


def test_forward_multiplies_by_the_mask():
    model = encoder().eval()
    mods = sparsify(model)
    lin = next(iter(mods.values()))
    keep = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    lin.mask.copy_(pack_mask(keep))
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight * keep, lin.bias))


def test_cubic_events_are_exact_and_monotone():
    model = classifier()
    mods = sparsify(model)
    pruner = Pruner(mods, "magnitude", "tensor", Cubic(0.0, 0.9, 0, 20, 4))
    previous = {n: torch.ones(m.weight.shape, dtype=torch.bool) for n, m in mods.items()}
    for t in range(21):
        stats = pruner.step(t)
        if t % 4 and t != 20:
            assert stats == {}
            continue
        target = pruner.schedule.value_at(t)
        kept = sum(m.weight.numel() - math.floor(target * m.weight.numel()) for m in mods.values())
        assert pruner.nnz() == kept
        for n, m in mods.items():
            keep = m.dense_mask()
            assert not (m.weight[~keep] != 0).any()  # pruned weights zeroed
            assert not (keep & ~previous[n]).any()  # magnitude never revives a zeroed weight
            previous[n] = keep
            m.weight.data += 0.01 * torch.randn_like(m.weight) * keep  # training moves kept weights
    assert stats["sparsity"] == pytest.approx(1 - kept / pruner.numel)


def test_global_pattern_exact():
    model = classifier()
    mods = sparsify(model)
    pruner = Pruner(mods, "magnitude", "global", None)
    pruner.prune(0.73)
    n = pruner.numel
    assert pruner.nnz() == kept_oracle(n, 0.73)


def test_lock_keeps_the_nonzeros():
    model = classifier()
    mods = sparsify(model)
    for m in mods.values():
        m.weight.data[m.weight.abs() < 0.02] = 0
    zeros = sum(int((m.weight == 0).sum()) for m in mods.values())
    pruner = lock(mods)
    assert pruner.numel - pruner.nnz() == zeros
    assert all(m.weight_is_masked for m in mods.values())


def test_report_counts_masks_and_parameters():
    model = classifier()
    mods = sparsify(model)
    Pruner(mods, "magnitude", "tensor", None).prune(0.5)
    report = sparsity_report(model)
    assert len(report["matrices"]) == 12
    assert all(m["sparsity"] == 0.5 for m in report["matrices"])
    assert report["pruned"]["sparsity"] == 0.5
    pruned = report["pruned"]["numel"] - report["pruned"]["nnz"]
    total = sum(p.numel() for p in model.parameters())
    assert report["all"]["numel"] == total
    assert report["all"]["nnz"] == total - pruned - sum(int((p == 0).sum()) for n, p in model.named_parameters() if "layer" not in n or "LayerNorm" in n or "bias" in n)


def test_fake_quantize_is_symmetric_8_bit_with_ste():
    x = torch.tensor([-1.0, -0.3, 0.0, 0.004, 0.5, 1.0], requires_grad=True)
    q = fake_quantize(x, torch.tensor(1.0), 8)
    scale = 1.0 / 127
    torch.testing.assert_close(q.detach(), torch.round(x.detach() / scale) * scale)
    assert q[2] == 0  # zeros stay zero: the pattern survives quantization
    q.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight-through


def test_qat_forward_keeps_the_pattern():
    model = classifier()
    mods = sparsify(model)
    Pruner(mods, "magnitude", "tensor", None).prune(0.8)
    enable_qat(mods)
    model.train()
    out = model(**inputs())
    out.logits.sum().backward()
    for m in mods.values():
        assert m.quantizer.input_max > 0
        assert not (m.weight.grad[~m.dense_mask()] != 0).any()


def test_save_pretrained_still_works(tmp_path):
    model = classifier()
    sparsify(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_other_bert_families(family):
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    torch.manual_seed(0)
    if family == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                     max_position_embeddings=32))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                               intermediate_size=64, max_position_embeddings=40))
    mods = sparsify(model)
    assert len(mods) == 12
    Pruner(mods, "magnitude", "structured", None, pattern_kwargs={"num_heads": 4}).prune(0.5)
    out = model(input_ids=torch.randint(3, 64, (2, 6)))
    assert out.logits.shape == (2, 2)
    assert sparsity_report(model)["pruned"]["sparsity"] == pytest.approx(0.5)


def test_autocast_casts_like_nn_linear():
    model = classifier()
    sparsify(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs())
    assert out.logits.dtype == torch.bfloat16
    out.logits.float().sum().backward()
    assert next(iter(masked_modules(model).values())).weight.grad.dtype == torch.float32
