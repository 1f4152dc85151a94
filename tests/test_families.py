"""The model-family table: every family's encoder matrices are found by sparsify, grouped by the
structured pattern, cut by small-dense and counted by the report, on tiny random models."""
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification,
                          GPT2Config, GPT2Model, RobertaConfig, RobertaForSequenceClassification)

from sparsebert.families import FAMILIES, ROLES, Family, UnknownFamily, family_of, matrix_role
from sparsebert.methods import get_method
from sparsebert.methods.baselines import small_dense
from sparsebert.ops import unpack_mask
from sparsebert.sparsity import Pruner, export_dense, sparsify, sparsity_report
from tinybert import context

LAYERS, HEADS, HIDDEN, FFN = 4, 4, 32, 48


def bert():
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                    num_attention_heads=HEADS, intermediate_size=FFN,
                                                    max_position_embeddings=32))


def roberta():
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                          num_attention_heads=HEADS, intermediate_size=FFN,
                                                          max_position_embeddings=40, pad_token_id=1))


def distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=HIDDEN, n_layers=LAYERS,
                                                                n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=32))


MODELS = {"bert": bert, "roberta": roberta, "distilbert": distilbert}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return request.param, MODELS[request.param]()


def test_every_family_is_found_by_its_config(model):
    name, m = model
    assert family_of(m) is FAMILIES.get(name)
    assert len(family_of(m).layer_list(m)) == LAYERS


def test_sparsify_selects_the_six_matrices_of_every_layer(model):
    _, m = model
    masked = sparsify(m)
    places = sorted(matrix_role(n) for n in masked)
    assert places == sorted((layer, role) for layer in range(LAYERS) for role in ROLES)
    assert not any("embeddings" in n or "classifier" in n or "pooler" in n for n in masked)


def test_structured_pruning_keeps_whole_heads_and_neurons(model):
    _, m = model
    mods = sparsify(m)
    Pruner(mods, "magnitude", "structured", None, num_heads=HEADS).prune(0.5)
    head_dim = HIDDEN // HEADS
    for name, module in mods.items():
        layer, role = matrix_role(name)
        keep = unpack_mask(module.mask, module.in_features)
        if role in ("query", "key", "value"):  # whole rows of a head
            assert (keep.reshape(HEADS, head_dim, -1).all((1, 2)) | ~keep.reshape(HEADS, head_dim, -1).any((1, 2))).all()
        elif role == "ffn-in":  # whole rows (neurons)
            assert (keep.all(1) | ~keep.any(1)).all()
    report = sparsity_report(m)
    assert report["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    x = torch.randint(3, 64, (2, 8))
    assert torch.isfinite(m(input_ids=x).logits).all()


def test_small_dense_cuts_layers_and_still_runs(model):
    _, m = model
    small_dense(m, num_layers=2)
    assert len(family_of(m).layer_list(m)) == 2 and m.config.num_hidden_layers == 2
    assert m(input_ids=torch.randint(3, 64, (2, 8))).logits.shape == (2, 2)
    assert len(sparsity_report(m)["layers"]) == 2


def test_a_method_prunes_every_family_and_the_export_counts_the_same(model, tmp_path):
    _, m = model
    method = get_method("oneshot-magnitude", sparsity=0.75)
    method.setup(context(m))
    report = sparsity_report(m)
    assert report["overall"] == report["pruned"]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert set(report["layers"]) == {str(i) for i in range(LAYERS)}
    export_dense(m, tmp_path)
    plain = type(m).from_pretrained(tmp_path)
    assert sparsity_report(plain)["overall"] == report["overall"]
    assert sparsity_report(plain)["layers"] == report["layers"]


def test_an_unknown_family_is_a_clear_error():
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(UnknownFamily, match="no model family answers to model_type 'gpt2'.*sparsebert/families.py"):
        small_dense(gpt2, num_layers=1)


def test_adding_a_family_is_one_entry(monkeypatch):
    monkeypatch.setattr(FAMILIES, "_items", dict(FAMILIES._items))
    bert_matrices = FAMILIES.get("bert").matrices
    FAMILIES.register("electra")(Family("electra", ("electra",), "encoder.layer", "embeddings", bert_matrices))
    torch.manual_seed(0)
    m = ElectraForSequenceClassification(ElectraConfig(vocab_size=64, embedding_size=HIDDEN, hidden_size=HIDDEN,
                                                       num_hidden_layers=2, num_attention_heads=HEADS,
                                                       intermediate_size=FFN, max_position_embeddings=32))
    assert family_of(m).name == "electra"
    get_method("oneshot-magnitude", sparsity=0.5).setup(context(m))
    assert sparsity_report(m)["overall"] == pytest.approx(0.5, abs=1e-3)
    small_dense(m, num_layers=1)
    assert m.config.num_hidden_layers == 1


def test_a_family_names_every_role_in_order():
    with pytest.raises(ValueError, match="must name the roles"):
        Family("x", ("x",), "layers", "emb", {"query": "q"})
