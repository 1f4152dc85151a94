"""Tokenization (cached on disk), padding into batches, and masked-LM corruption.

A feature is {input_ids: int64 array, token_type_ids: int64 array, label, index}; a batch holds
the keys of the Method contract: input_ids, attention_mask, token_type_ids, labels (unless the
objective is representation) and index (global example indices).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # its truncation/padding fields change with every call's settings
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\x00{text}".encode()).hexdigest()[:16]


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """A short digest of a tensor's values (keys caches that depend on a model's weights)."""
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _cache_path(cache_dir, kind: str, tokenizer, max_len: int, content_digest: str) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(
        f"v{CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}|{kind}|{max_len}|{content_digest}".encode()).hexdigest()[:24]
    safe_kind = "".join(c if c.isalnum() or c in "-_" else "_" for c in kind)
    return Path(cache_dir).expanduser() / f"{safe_kind}-{key}.npz"


def _load_cache(path: Path | None):
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # a broken cache entry is rebuilt, never trusted
        return None


def _save_cache(path: Path | None, arrays: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pack(seqs_ids: list[list[int]], seqs_types: list[list[int]]) -> dict:
    lengths = np.array([len(s) for s in seqs_ids], dtype=np.int64)
    return {"ids": np.array([t for s in seqs_ids for t in s], dtype=np.int64),
            "types": np.array([t for s in seqs_types for t in s], dtype=np.int64),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}


def _unpack(arrays: dict, labels) -> list[dict]:
    off = arrays["offsets"]
    return [{"input_ids": arrays["ids"][off[i]:off[i + 1]], "token_type_ids": arrays["types"][off[i]:off[i + 1]],
             "label": None if labels is None else labels[i], "index": i} for i in range(len(off) - 1)]


def tokenize_examples(examples: list[dict], tokenizer, max_len: int, kind: str, cache_dir=None) -> list[dict]:
    """Task examples -> features, truncated to max_len; cached under cache_dir by content."""
    digest = hashlib.sha256(json.dumps([(e["text_a"], e["text_b"]) for e in examples]).encode()).hexdigest()
    path = _cache_path(cache_dir, kind, tokenizer, max_len, digest)
    arrays = _load_cache(path)
    if arrays is None:
        ids, types = [], []
        step = 1000
        for s in tqdm(range(0, len(examples), step), desc=f"tokenizing {kind}", unit="k examples",
                      disable=len(examples) < 20 * step, leave=False):
            chunk = examples[s:s + step]
            a = [e["text_a"] for e in chunk]
            b = [e["text_b"] for e in chunk] if chunk[0]["text_b"] is not None else None
            enc = tokenizer(a, b, truncation=True, max_length=max_len, return_token_type_ids=True)
            ids += enc["input_ids"]
            types += enc["token_type_ids"]
        arrays = _pack(ids, types)
        _save_cache(path, arrays)
    labels = [e["label"] for e in examples]
    return _unpack(arrays, None if all(x is None for x in labels) else labels)


def tokenize_corpus(docs: list[str], digest: str, tokenizer, max_len: int, kind: str, cache_dir=None) -> list[dict]:
    """A corpus -> blocks of max_len tokens: [CLS] + a window of the token stream + [SEP]."""
    path = _cache_path(cache_dir, kind, tokenizer, max_len, digest)
    arrays = _load_cache(path)
    if arrays is None:
        stream: list[int] = []
        for s in tqdm(range(0, len(docs), 1000), desc=f"tokenizing {kind}", unit="k docs",
                      disable=len(docs) < 20_000, leave=False):
            for ids in tokenizer(docs[s:s + 1000], add_special_tokens=False)["input_ids"]:
                stream += ids
        width = max_len - 2
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        blocks = [[cls] + stream[i:i + width] + [sep] for i in range(0, len(stream) - width + 1, width)]
        if not blocks:
            raise ValueError(f"corpus {kind}: {len(stream)} tokens, fewer than one block of {max_len}")
        arrays = _pack(blocks, [[0] * len(b) for b in blocks])
        _save_cache(path, arrays)
    return _unpack(arrays, None)


def collate(features: list[dict], pad_id: int, objective: str) -> dict:
    """Pad to the longest sequence in the batch."""
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        input_ids[i, :k] = torch.from_numpy(np.asarray(f["input_ids"]))
        token_type_ids[i, :k] = torch.from_numpy(np.asarray(f["token_type_ids"]))
        attention_mask[i, :k] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
             "index": torch.tensor([f["index"] for f in features], dtype=torch.long)}
    if objective == "classification":
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
    elif objective == "regression":
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.float32)
    return batch


def mask_tokens(batch: dict, tokenizer, probability: float, generator: torch.Generator) -> dict:
    """BERT masked-LM corruption: choose `probability` of the non-special tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. labels = the original ids there, -100 elsewhere."""
    ids = batch["input_ids"]
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in tokenizer.all_special_ids:
        special |= ids == sid
    special |= batch["attention_mask"] == 0
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (roll < 0.8)
    to_random = chosen & (roll >= 0.8) & (roll < 0.9)
    random_ids = torch.randint(len(tokenizer), ids.shape, generator=generator)
    corrupted = torch.where(to_mask, torch.full_like(ids, tokenizer.mask_token_id), ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return {**batch, "input_ids": corrupted, "labels": labels}
