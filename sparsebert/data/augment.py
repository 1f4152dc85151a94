"""Data augmentation for small tasks, as SparseBERT takes it from TinyBERT (Jiao et al. 2020): every
training example gets `copies` variants in which each word is, with probability `p`, replaced by one
of its `k` candidates. A word's candidates come from the model's masked-LM head where it has one (the
k most likely whole words at the word's position, masked; TinyBERT's rule for single-piece words),
and otherwise from the model's own input embeddings: the k whole-word vocabulary entries nearest (by
cosine) to the mean embedding of the word's pieces (in place of TinyBERT's GloVe neighbours, which
would need a download). Labels are copied: the methods that distil from a teacher learn the
teacher's view of each variant.

Deterministic for a seed, and cached on disk like tokenization (key: model, tokenizer, settings and
the examples' content).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import torch

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Augmentation:
    copies: int          # variants per example (TinyBERT: about 20)
    p: float = 0.4       # probability that a word is replaced
    k: int = 15          # candidates per word
    seed: int = 0

    def __post_init__(self):
        if self.copies < 0 or not 0.0 < self.p <= 1.0 or self.k < 1:
            raise ValueError(f"augmentation needs copies >= 0, 0 < p <= 1 and k >= 1, got {self}")


class Candidates:
    """Replacement candidates for the words of one model's vocabulary."""

    def __init__(self, model, tokenizer, k: int, batch_size: int = 64):
        self.tokenizer, self.k, self.batch_size = tokenizer, k, batch_size
        self.mlm = model if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None else None
        emb = model.get_input_embeddings().weight.detach().float()
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_ids)
        pool = sorted(i for w, i in vocab.items() if w.isalpha() and len(w) > 1 and i not in special and i < emb.shape[0])
        self.pool = torch.tensor(pool)
        self.pool_words = [tokenizer.convert_ids_to_tokens(i) for i in pool]
        self.embeddings = emb
        self.unit_pool = torch.nn.functional.normalize(emb[self.pool], dim=-1)
        self.by_embedding: dict[str, list[str]] = {}

    @torch.no_grad()
    def nearest(self, words: list[str]) -> dict[str, list[str]]:
        """The k whole words nearest to each word in the input-embedding space (the word itself excluded)."""
        new = sorted(set(words) - set(self.by_embedding))
        for b in range(0, len(new), 1024):
            chunk = new[b:b + 1024]
            pieces = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
            queries = torch.stack([self.embeddings[ids].mean(0) for ids in pieces])
            best = (torch.nn.functional.normalize(queries, dim=-1) @ self.unit_pool.T).topk(self.k + 1, dim=-1).indices
            for word, row in zip(chunk, best.tolist()):
                self.by_embedding[word] = [self.pool_words[i] for i in row if self.pool_words[i] != word][:self.k]
        return {w: self.by_embedding[w] for w in words}

    @torch.no_grad()
    def masked(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[list[list[str] | None]]:
        """For each text and word span: the MLM head's k best whole words at the masked word (single-piece
        words only; None for the others, which use `nearest`)."""
        queries = []  # (text index, span index, masked ids, mask position)
        for t, (text, word_spans) in enumerate(zip(texts, spans)):
            enc = self.tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=512)
            for s, (start, end) in enumerate(word_spans):
                pieces = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= start and b <= end]
                if len(pieces) == 1:
                    ids = list(enc["input_ids"])
                    ids[pieces[0]] = self.tokenizer.mask_token_id
                    queries.append((t, s, ids, pieces[0]))
        out: list[list[list[str] | None]] = [[None] * len(s) for s in spans]
        self.mlm.eval()
        for b in range(0, len(queries), self.batch_size):
            chunk = queries[b:b + self.batch_size]
            width = max(len(q[2]) for q in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, q in enumerate(chunk):
                ids[i, :len(q[2])] = torch.tensor(q[2])
                mask[i, :len(q[2])] = 1
            logits = self.mlm(input_ids=ids, attention_mask=mask).logits
            at = logits[torch.arange(len(chunk)), torch.tensor([q[3] for q in chunk])][:, self.pool]
            for q, best in zip(chunk, at.topk(self.k + 1, dim=-1).indices.tolist()):
                original = texts[q[0]][spans[q[0]][q[1]][0]:spans[q[0]][q[1]][1]].lower()
                out[q[0]][q[1]] = [self.pool_words[i] for i in best if self.pool_words[i] != original][:self.k]
        return out


def _words(tokenizer, text: str) -> list[tuple[int, int]]:
    """Spans of the alphabetic words of a text, as the tokenizer's pre-tokenizer splits it."""
    return [(a, b) for w, (a, b) in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) if w.isalpha()]


def _variant(text: str, spans, candidates, p: float, rng: random.Random) -> str:
    parts, last = [], 0
    for (a, b), options in zip(spans, candidates):
        if options and rng.random() < p:
            parts += [text[last:a], rng.choice(options)]
            last = b
    return "".join(parts) + text[last:]


def augment(examples: list[dict], model, tokenizer, config: Augmentation, cache_dir=None, fingerprint: str = "") -> list[dict]:
    """The examples followed by `config.copies` variants of each (labels copied), in example order."""
    if config.copies == 0:
        return examples
    digest = hashlib.sha256(json.dumps([[e["text_a"], e["text_b"]] for e in examples]).encode()).hexdigest()
    key = hashlib.sha256(f"v{CACHE_VERSION}|{fingerprint}|{dataclasses.astuple(config)}|{digest}".encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"augment-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        texts = json.loads(path.read_text())
    else:
        texts = _variants(examples, model, tokenizer, config)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(texts, f)
            os.replace(tmp, path)
    variants = [{**e, "text_a": a, "text_b": b} for e, pairs in zip(examples, texts) for a, b in pairs]
    return examples + variants


def _variants(examples: list[dict], model, tokenizer, config: Augmentation) -> list[list[list[str | None]]]:
    cands = Candidates(model, tokenizer, config.k)
    fields = [f for f in ("text_a", "text_b") if examples[0][f] is not None]
    options = {}
    for f in fields:
        texts = [e[f] for e in examples]
        spans = [_words(tokenizer, t) for t in texts]
        masked = cands.masked(texts, spans) if cands.mlm is not None else [[None] * len(s) for s in spans]
        near = cands.nearest([t[a:b].lower() for t, s in zip(texts, spans) for a, b in s])
        options[f] = [(t, s, [m if m is not None else near[t[a:b].lower()] for (a, b), m in zip(s, ms)])
                      for t, s, ms in zip(texts, spans, masked)]
    rng = random.Random(config.seed)
    out = []
    for i in range(len(examples)):
        pairs = []
        for _ in range(config.copies):
            new = {f: _variant(*options[f][i], config.p, rng) for f in fields}
            pairs.append([new.get("text_a"), new.get("text_b")])
        out.append(pairs)
    return out
