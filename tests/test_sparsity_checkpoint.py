"""Sparse checkpoint round trip, and the plain transformers export loaded without sparsebert."""
import json
import subprocess
import sys

import torch
from tinybert import batch, classifier, config
from transformers import BertModel

from sparsebert.sparsity import (Pruner, load_sparse, masked_modules, save_sparse, sparsify, sparsity_report,
                                 export_dense)


def pruned_model(scores=False):
    model = classifier().eval()
    mods = sparsify(model, {"scores": scores})
    if scores:
        for m in mods.values():
            m.scores.data.normal_()
        Pruner(mods, "movement", "tensor", None, zero_weights=False).prune(0.75)
    else:
        Pruner(mods, "magnitude", "global", None).prune(0.75)
    return model


def inputs():
    b = batch(0)
    return {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_round_trip_keeps_masks_scores_and_sparsity(tmp_path):
    model = pruned_model(scores=True)
    save_sparse(model, tmp_path, metadata={"method": "cap"})
    meta = json.loads((tmp_path / "sparsebert.json").read_text())
    assert meta["method"] == "cap" and meta["sparsify"]["scores"] is True
    loaded = load_sparse(tmp_path)
    for (name, a), b in zip(masked_modules(model).items(), masked_modules(loaded).values()):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight) and torch.equal(a.scores, b.scores), name
    assert sparsity_report(loaded) == sparsity_report(model)
    assert meta["sparsity"]["pruned"] == sparsity_report(model)["pruned"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, model(**inputs()).logits)


def test_plain_export_loads_without_sparsebert(tmp_path):
    model = pruned_model()
    export_dense(model, tmp_path)
    with torch.no_grad():
        expected = model(**inputs()).logits
    ids = json.dumps({k: v.tolist() for k, v in inputs().items()})
    # -I: isolated (no cwd, no user site); sparsebert is made unimportable before transformers loads.
    code = f"""
import json, sys
sys.modules["sparsebert"] = None
import torch, transformers
model = transformers.AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}).eval()
x = {{k: torch.tensor(v) for k, v in json.loads({ids!r}).items()}}
enc = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
zeros = sum(int((w == 0).sum()) for w in enc); numel = sum(w.numel() for w in enc)
with torch.no_grad():
    print(json.dumps({{"logits": model(**x).logits.tolist(), "sparsity": zeros / numel,
                      "keys": [k for k in model.state_dict() if k.endswith(("mask", "scores"))]}}))
"""
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["keys"] == []
    assert out["sparsity"] == sparsity_report(model)["pruned"]["sparsity"]
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.name.endswith("sparsebert.json") for p in tmp_path.iterdir())


def test_quantized_and_tied_models_round_trip(tmp_path):
    from tinybert import config
    from transformers import BertForMaskedLM

    from sparsebert.sparsity import enable_qat

    torch.manual_seed(0)
    model = BertForMaskedLM(config())  # tied input/output embeddings
    mods = sparsify(model)
    Pruner(mods, "magnitude", "tensor", None).prune(0.5)
    enable_qat(mods, bits=4)
    model.train()
    model(**inputs())  # calibrates the input ranges
    model.eval()
    save_sparse(model, tmp_path)
    loaded = load_sparse(tmp_path)
    assert next(iter(masked_modules(loaded).values())).quantizer.bits == 4
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, model(**inputs()).logits)


def test_a_model_saved_without_its_pooler_loads(tmp_path):
    torch.manual_seed(0)
    model = BertModel(config(), add_pooling_layer=False).eval()
    Pruner(sparsify(model), "magnitude", "global", None).prune(0.75)
    save_sparse(model, tmp_path)
    assert json.loads((tmp_path / "sparsebert.json").read_text())["absent_modules"] == ["pooler"]
    loaded = load_sparse(tmp_path)
    assert loaded.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).last_hidden_state, model(**inputs()).last_hidden_state)
