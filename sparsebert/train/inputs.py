"""What a stage trains and evaluates on: a GLUE-style task or a raw-text corpus. Each kind gives
its training features, the batch of a step, and the evaluation of a model, so that the stage
runner has no branch on the kind."""
from __future__ import annotations

import torch

from ..data import collate as D
from ..data import glue
from ..data import text as T
from ..data.augment import Augmentation, augment
from . import evaluation as E
from .errors import StageError
from .models import has_mlm_head, load_model

# A prime above any step count: (seed, step) pairs never share the generator seed of MLM corruption.
MLM_SEED_STRIDE = 1_000_003


def on_corpus(cfg: dict) -> bool:
    """Upstream trains on a corpus; `evaluate` with --corpus measures the upstream objective."""
    return cfg["stage"] == "upstream" or (cfg["stage"] == "evaluate" and cfg["data"]["corpus"] is not None)


def corpus_objective(cfg: dict) -> str:
    """A corpus stage's objective: "auto" is mlm where the model has an MLM head, else representation."""
    objective = cfg["data"]["objective"]
    if objective == "auto":
        return "mlm" if has_mlm_head(cfg["model"]["name"]) else "representation"
    return objective


def subset(examples: list, limit: int | None, seed: int | None) -> list:
    """At most `limit` examples: the first ones, or (with a seed) a random choice fixed by the seed."""
    if not limit or limit >= len(examples):
        return examples
    if seed is None:
        return examples[:limit]
    pick = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    return [examples[i] for i in pick]


class TaskInputs:
    """A task's training features and dev splits; evaluation by the task's GLUE metrics."""
    reference_name = "teacher"

    def __init__(self, cfg: dict, tokenizer, device: torch.device):
        d, t = cfg["data"], cfg["training"]
        self.task = glue.get_task(d["task"])
        self.objective, self.num_labels = self.task.objective, self.task.num_labels
        self.tokenizer, self.device, self.precision, self.eval_bs = tokenizer, device, cfg["run"]["precision"], t["eval_batch_size"]
        train = subset(glue.load_split(self.task, d["data_dir"], "train"), d["max_train_examples"], d["subset_seed"])
        self.budget_size = len(train)  # epochs count passes over the examples before augmentation
        if d["augment"]:
            train = augmented(train, cfg, tokenizer)
        self.train = D.tokenize_examples(train, tokenizer, d["max_len"], f"{self.task.name}-train", d["cache_dir"])
        self.dev = {}
        for split in self.task.dev_splits:
            examples = glue.load_split(self.task, d["data_dir"], split)
            examples = examples[:d["max_eval_examples"]] if d["max_eval_examples"] else examples
            self.dev[split] = D.tokenize_examples(examples, tokenizer, d["max_len"], f"{self.task.name}-{split}",
                                                  d["cache_dir"])

    def batch(self, features: list[dict], step: int) -> dict:
        return D.collate(features, self.tokenizer.pad_token_id, self.objective)

    def evaluate(self, model, reference=None) -> dict:
        return E.eval_task(model, self.task, self.dev, self.tokenizer.pad_token_id, self.eval_bs, self.device,
                           self.precision)

    def reference(self, model) -> dict:
        return self.evaluate(model)


def augmented(examples: list[dict], cfg: dict, tokenizer) -> list[dict]:
    """The examples and their variants, the candidates from the student's model (its MLM head or its
    input embeddings), seeded by the run's seed."""
    name = cfg["model"]["name"]
    model = load_model(name, "mlm" if has_mlm_head(name) else "representation")
    fingerprint = f"{D.tokenizer_fingerprint(tokenizer)}|{D.tensor_fingerprint(model.get_input_embeddings().weight)}"
    config = Augmentation(cfg["data"]["augment"], seed=cfg["training"]["seed"])
    return augment(examples, model, tokenizer, config, cfg["data"]["cache_dir"], fingerprint)


class CorpusInputs:
    """Blocks of raw text; masked-LM loss, or likeness to the dense reference (representation)."""
    reference_name = "dense pre-trained"
    num_labels = 0

    def __init__(self, cfg: dict, tokenizer, device: torch.device):
        d, t = cfg["data"], cfg["training"]
        self.objective = corpus_objective(cfg)
        self.tokenizer, self.device, self.precision, self.eval_bs = tokenizer, device, cfg["run"]["precision"], t["eval_batch_size"]
        self.mlm_probability, self.seed = d["mlm_probability"], t["seed"]
        docs, digest = T.load_corpus(d["corpus"], "train")
        blocks = D.tokenize_corpus(docs, digest, tokenizer, d["max_len"], "corpus", d["cache_dir"])
        if d["eval_corpus"] is not None:
            edocs, edigest = T.load_corpus(d["eval_corpus"], "validation")
            held_out = D.tokenize_corpus(edocs, edigest, tokenizer, d["max_len"], "eval-corpus", d["cache_dir"])
        else:
            if len(blocks) < 2:
                raise StageError(f"corpus has {len(blocks)} block(s) of {d['max_len']} tokens: too little text")
            n_eval = max(1, int(round(len(blocks) * d["eval_fraction"])))
            blocks, held_out = blocks[:-n_eval], blocks[-n_eval:]
        blocks = subset(blocks, d["max_train_examples"], d["subset_seed"])
        self.held_out = held_out[:d["max_eval_examples"]] if d["max_eval_examples"] else held_out
        # global indices of the training set, as the method contract says
        self.train = [{**f, "index": i} for i, f in enumerate(blocks)]
        self.budget_size = len(self.train)

    def batch(self, features: list[dict], step: int) -> dict:
        batch = D.collate(features, self.tokenizer.pad_token_id, self.objective)
        if self.objective == "mlm":
            gen = torch.Generator().manual_seed(self.seed * MLM_SEED_STRIDE + step)
            batch = D.mask_tokens(batch, self.tokenizer, self.mlm_probability, gen)
        return batch

    def evaluate(self, model, reference=None) -> dict:
        if self.objective == "mlm":
            return E.eval_mlm(model, self.held_out, self.tokenizer, self.eval_bs, self.device, self.precision,
                              self.mlm_probability, self.seed + 1)
        return E.eval_representation(model, reference, self.held_out, self.tokenizer.pad_token_id, self.eval_bs,
                                     self.device, self.precision)

    def reference(self, model) -> dict:
        return dict(E.REPRESENTATION_SELF) if self.objective == "representation" else self.evaluate(model)


def make_inputs(cfg: dict, tokenizer, device: torch.device) -> TaskInputs | CorpusInputs:
    return (CorpusInputs if on_corpus(cfg) else TaskInputs)(cfg, tokenizer, device)
