"""TinyBERT-style augmentation: deterministic per seed, cached, words replaced by the model's own
candidates (MLM head, else input-embedding neighbours); the budget counts the original examples."""
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from _train_fixtures import make_model
from sparsebert.data.augment import Augmentation, Candidates, augment
from sparsebert.train import main
from sparsebert.train.trainer import schedule

EXAMPLES = [{"text_a": "the cat sat on the mat", "text_b": None, "label": 1},
            {"text_a": "a dog ran , very quick !", "text_b": None, "label": 0}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer
    path = make_model(tmp_path_factory.mktemp("aug") / "m", mlm=False)
    return BertModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_variants_follow_the_examples_with_their_labels(tiny):
    model, tok = tiny
    out = augment(EXAMPLES, model, tok, Augmentation(copies=3, p=1.0, seed=0))
    assert out[:2] == EXAMPLES and len(out) == 2 + 2 * 3
    assert [e["label"] for e in out[2:]] == [1, 1, 1, 0, 0, 0]
    for e in out[2:5]:
        words = e["text_a"].split()
        assert len(words) == 6 and words != EXAMPLES[0]["text_a"].split()
    assert out[5]["text_a"].split()[3] == "," and out[5]["text_a"].endswith("!")  # punctuation stays


def test_deterministic_per_seed_and_cached(tiny, tmp_path):
    model, tok = tiny
    a = augment(EXAMPLES, model, tok, Augmentation(copies=4, seed=1), tmp_path, "fp")
    assert a == augment(EXAMPLES, model, tok, Augmentation(copies=4, seed=1))
    assert a != augment(EXAMPLES, model, tok, Augmentation(copies=4, seed=2))
    assert len(list(tmp_path.glob("augment-*.json"))) == 1
    assert augment(EXAMPLES, None, tok, Augmentation(copies=4, seed=1), tmp_path, "fp") == a  # from the cache


def test_embedding_neighbours_exclude_the_word(tiny):
    model, tok = tiny
    near = Candidates(model, tok, k=5).nearest(["cat", "dog"])
    emb = torch.nn.functional.normalize(model.get_input_embeddings().weight, dim=-1)
    vocab = tok.get_vocab()
    best = max((w for w in vocab if w.isalpha() and len(w) > 1 and w != "cat"),
               key=lambda w: float(emb[vocab[w]] @ emb[vocab["cat"]]))
    assert near["cat"][0] == best and "cat" not in near["cat"] and len(near["dog"]) == 5


def test_a_masked_lm_head_gives_the_candidates(tiny):
    _, tok = tiny
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    favourite = tok.convert_tokens_to_ids("bird")
    with torch.no_grad():
        mlm.cls.predictions.decoder.bias.zero_()
        mlm.cls.predictions.decoder.bias[favourite] = 100.0  # the head always predicts "bird"
    out = augment(EXAMPLES[:1], mlm, tok, Augmentation(copies=2, p=1.0, k=1, seed=0))
    assert out[1]["text_a"] == "bird bird bird bird bird bird"


def test_bad_settings():
    with pytest.raises(ValueError):
        Augmentation(copies=-1)
    with pytest.raises(ValueError):
        Augmentation(copies=2, p=0.0)


def test_the_budget_counts_examples_before_augmentation():
    t = {"batch_size": 4, "epochs": 2.0, "max_steps": None, "min_steps": None}
    assert schedule(40 * 21, t, budget_size=40) == (210, 20)
    assert schedule(40, {**t, "min_steps": 100}) == (10, 100)
    assert schedule(40, {**t, "min_steps": 5}) == (10, 20)
    assert schedule(40, {**t, "min_steps": 100, "max_steps": 7}) == (10, 7)


def test_augment_through_the_cli(tmp_path):
    from _train_fixtures import write_glue
    model, glue = make_model(tmp_path / "m"), write_glue(tmp_path / "glue", n_train=16, n_dev=8)
    run = tmp_path / "run"
    assert main(["teacher", "--model", str(model), "--task", "sst2", "--data-dir", str(glue), "--run-dir", str(run),
                 "--cache-dir", str(tmp_path / "cache"), "--max-len", "16", "--batch-size", "4", "--threads", "1",
                 "--epochs", "1", "--augment", "2"]) == 0
    results = json.loads((run / "done.json").read_text())
    assert results["train_size"] == 48 and results["steps"] == 4
