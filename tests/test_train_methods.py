"""The library's pruning methods through the trainer: a tiny pipeline per method, its recipe applied,
the sparsity it promises measured on the exported plain-transformers model."""
import json

import pytest

from _train_fixtures import make_model, write_corpus, write_glue
from sparsebert.methods import METHODS
from sparsebert.train import main

PRUNING = ["prune-ofa", "sparsebert-kap", "cap", "gradual-magnitude", "oneshot-magnitude"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {"root": root, "mlm": make_model(root / "tiny-mlm"), "enc": make_model(root / "tiny-enc", mlm=False),
            "glue": write_glue(root / "glue"), "corpus": write_corpus(root / "corpus.txt")}


@pytest.mark.parametrize("method", PRUNING)
def test_method_pipeline(env, method):
    if method not in METHODS:
        pytest.skip(f"method {method} is not merged yet")
    run = env["root"] / method
    assert main(["pipeline", "--model", str(env["mlm"]), "--method", method, "--corpus", str(env["corpus"]),
                 "--tasks", "rte", "--data-dir", str(env["glue"]), "--cache-dir", str(env["root"] / "cache"),
                 "--run-dir", str(run), "--max-len", "16", "--batch-size", "4", "--threads", "1",
                 "--max-steps", "6", "--set", "method.sparsity=0.75", "training.eval_batch_size=8"]) == 0
    summary = json.loads((run / "done.json").read_text())
    down = summary["stages"]["downstream-rte"]
    cfg = json.loads((run / "downstream-rte" / "config.json").read_text())["config"]
    assert cfg["method"]["name"] == method and cfg["method"]["sparsity"] == 0.75
    assert down["sparsity"]["overall"] == pytest.approx(0.75, abs=0.02), down["sparsity"]
    assert ("upstream" in summary["stages"]) == (cfg["roles"]["student"] in (None, "upstream"))
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(run / "downstream-rte" / "model")


def test_prune_ofa_upstream_representation(env):
    if "prune-ofa" not in METHODS:
        pytest.skip("prune-ofa is not merged yet")
    run = env["root"] / "ofa-rep"
    assert main(["upstream", "--model", str(env["enc"]), "--method", "prune-ofa", "--corpus", str(env["corpus"]),
                 "--cache-dir", str(env["root"] / "cache"), "--run-dir", str(run), "--max-len", "16",
                 "--batch-size", "4", "--threads", "1", "--max-steps", "6", "--set", "method.sparsity=0.8"]) == 0
    results = json.loads((run / "done.json").read_text())
    assert results["objective"] == "representation"
    assert results["sparsity"]["overall"] == pytest.approx(0.8, abs=0.02)
