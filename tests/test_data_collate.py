"""Collation, masked-LM corruption, corpus blocks and the tokenization cache."""
import pytest
import torch

from _train_fixtures import make_model
from sparsebert.data import collate as D


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(make_model(tmp_path_factory.mktemp("m")))


EXAMPLES = [{"text_a": "the cat sat", "text_b": "on the mat", "label": 1},
            {"text_a": "a dog", "text_b": "ran", "label": 0},
            {"text_a": "the big red bird sat on a log", "text_b": "yes", "label": 1}]


def test_collate_batch_keys(tok, tmp_path):
    feats = D.tokenize_examples(EXAMPLES, tok, 8, "t", tmp_path)
    assert [f["index"] for f in feats] == [0, 1, 2]
    assert len(feats[2]["input_ids"]) == 8  # truncated
    batch = D.collate(feats, tok.pad_token_id, "classification")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
    assert batch["input_ids"].shape == (3, 8)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # [CLS] a dog [SEP] ran [SEP]
    assert batch["input_ids"][1, 6:].eq(tok.pad_token_id).all()
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # longest-first truncation
    assert batch["labels"].tolist() == [1, 0, 1] and batch["index"].tolist() == [0, 1, 2]
    assert "labels" not in D.collate(feats, tok.pad_token_id, "representation")
    assert D.collate(feats, tok.pad_token_id, "regression")["labels"].dtype == torch.float32


def test_tokenization_cache(tok, tmp_path):
    calls = []

    class Counting:
        def __init__(self, t):
            self.t = t

        def __call__(self, *a, **k):
            calls.append(1)
            return self.t(*a, **k)

        def __getattr__(self, name):
            return getattr(self.t, name)

    wrapped = Counting(tok)
    a = D.tokenize_examples(EXAMPLES, wrapped, 16, "task-train", tmp_path)
    b = D.tokenize_examples(EXAMPLES, wrapped, 16, "task-train", tmp_path)
    assert len(calls) == 1  # second read from the cache
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    D.tokenize_examples(EXAMPLES, wrapped, 8, "task-train", tmp_path)  # other max_len: a new key
    D.tokenize_examples(EXAMPLES[:2], wrapped, 16, "task-train", tmp_path)  # other content: a new key
    assert len(calls) == 3
    assert len(list(tmp_path.glob("task-train-*.npz"))) == 3


def test_mask_tokens(tok):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (64, 32))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    out = D.mask_tokens(batch, tok, 0.15, gen)
    chosen = out["labels"] != -100
    assert 0.12 < chosen.float()[:, 1:-1].mean() < 0.18
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert (out["labels"][chosen] == ids[chosen]).all()
    masked = (out["input_ids"] == tok.mask_token_id) & chosen
    assert 0.7 < masked.sum() / chosen.sum() < 0.9
    assert (out["input_ids"][~chosen] == ids[~chosen]).all()
    again = D.mask_tokens(batch, tok, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], out["input_ids"])


def test_corpus_blocks(tok, tmp_path):
    docs = ["the cat sat on the mat . " * 5, "a dog ran . " * 4]
    blocks = D.tokenize_corpus(docs, "d1", tok, 10, "corpus", tmp_path)
    assert all(len(b["input_ids"]) == 10 for b in blocks)
    assert all(b["input_ids"][0] == tok.cls_token_id and b["input_ids"][-1] == tok.sep_token_id for b in blocks)
    assert len(blocks) == (7 * 5 + 4 * 4) // 8  # "." is a token ([UNK]) too
