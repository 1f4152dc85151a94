"""Shared by the trainer tests: a tiny BERT checkpoint with a word-level tokenizer, tiny GLUE-layout
TSV files, and a small pruning method (magnitude masks + distillation) standing in for the library's."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsebert.methods import METHODS, Method, model_inputs, register_method, task_loss

WORDS = ("the a cat dog bird sat ran on mat log tree is not was big small red blue good bad film movie "
         "great awful plot actor man woman saw ate fish quick slow very really who what why question answer "
         "it he she they yes no and or but").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_model(path: Path, mlm: bool = True, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT (with an MLM head unless mlm=False) and its tokenizer, saved to path."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer
    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertForMaskedLM(cfg) if mlm else BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(path)
    BertTokenizer(vocab=vocab).save_pretrained(path)
    return path


def _sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 9)))


def write_glue(root: Path, n_train: int = 24, n_dev: int = 12, seed: int = 0) -> Path:
    """Every GLUE task in its TSV layout (headers and columns as the GLUE files have them)."""
    rng = random.Random(seed)
    s = lambda: _sentence(rng)  # noqa: E731

    def write(task: str, name: str, header: list[str] | None, rows: list[list]) -> None:
        d = root / task
        d.mkdir(parents=True, exist_ok=True)
        lines = (["\t".join(header)] if header else []) + ["\t".join(str(x) for x in r) for r in rows]
        (d / name).write_text("\n".join(lines) + "\n", encoding="utf-8")

    for split, n in (("train", n_train), ("dev", n_dev)):
        def lab(text):  # learnable: "good" in the text decides the label
            return int("good" in text.split())
        rows = []
        for _ in range(n):
            t = s() + rng.choice([" good", ""])
            rows.append(["gj04", lab(t), "*" if not lab(t) else "", t])
        write("CoLA", f"{split}.tsv", None, rows)
        rows = []
        for _ in range(n):
            t = s() + rng.choice([" good", " bad"])
            rows.append([t, lab(t)])
        write("SST-2", f"{split}.tsv", ["sentence", "label"], rows)
        write("MRPC", f"{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
              [[rng.randint(0, 1), 100 + i, 200 + i, s(), s()] for i in range(n)])
        write("STS-B", f"{split}.tsv", ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                                        "sentence1", "sentence2", "score"],
              [[i, "main-news", "f", "2012", i, "none", "none", s(), s(), f"{rng.uniform(0, 5):.3f}"] for i in range(n)])
        write("QQP", f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              [[i, 2 * i, 2 * i + 1, s(), s(), rng.randint(0, 1)] for i in range(n)])
        write("QNLI", f"{split}.tsv", ["index", "question", "sentence", "label"],
              [[i, s(), s(), rng.choice(["entailment", "not_entailment"])] for i in range(n)])
        write("RTE", f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
              [[i, s(), s(), rng.choice(["entailment", "not_entailment"])] for i in range(n)])
        write("WNLI", f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
              [[i, s(), s(), rng.randint(0, 1)] for i in range(n)])
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    labels = ["entailment", "neutral", "contradiction"]
    write("MNLI", "train.tsv", mnli_header + ["label1", "gold_label"],
          [[i, i, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s(), s(), l, l]
           for i, l in ((i, rng.choice(labels)) for i in range(n_train))])
    for split in ("dev_matched", "dev_mismatched"):
        write("MNLI", f"{split}.tsv", mnli_header + ["label1", "label2", "label3", "label4", "label5", "gold_label"],
              [[i, i, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s(), s(), l, l, l, l, l, l]
               for i, l in ((i, rng.choice(labels)) for i in range(n_dev))])
    write("SST-2", "test.tsv", ["index", "sentence"], [[i, s()] for i in range(4)])
    write("CoLA", "test.tsv", ["index", "sentence"], [[i, s()] for i in range(4)])
    return root


def write_corpus(path: Path, n_lines: int = 60, seed: int = 1) -> Path:
    rng = random.Random(seed)
    paras = [" . ".join(_sentence(rng, 8) for _ in range(3)) for _ in range(n_lines)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


class MagnitudeDistill(Method):
    """Test method: task loss (+ distillation from the teacher), one-shot magnitude pruning of the
    encoder's linear layers at `prune_at`, masks kept in the method state and re-applied every step."""
    name = "test-magnitude"

    def __init__(self, sparsity: float = 0.5, prune_at: int = 2, warmup_ratio: float = 0.1):
        super().__init__(warmup_ratio)
        self.sparsity, self.prune_at = sparsity, prune_at
        self.masks: dict[str, torch.Tensor] = {}

    def _linears(self):
        for name, m in self.ctx.student.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layer." in name:
                yield name, m

    def training_loss(self, batch, step):
        out = self.ctx.student(**model_inputs(batch), output_hidden_states=True)
        if self.ctx.objective == "representation":
            with torch.no_grad():
                ref = self.ctx.teacher(**model_inputs(batch)).last_hidden_state
            loss = F.mse_loss(out.last_hidden_state, ref)
            return loss, {"distill": loss.item()}
        loss = task_loss(out.logits, batch, self.ctx.objective)
        logs = {"task": loss.item()}
        if self.ctx.teacher is not None and self.ctx.objective == "classification":
            with torch.no_grad():
                t = self.ctx.teacher(**model_inputs(batch)).logits
            kd = F.kl_div(F.log_softmax(out.logits, -1), F.softmax(t, -1), reduction="batchmean")
            loss = loss + kd
            logs["kd"] = kd.item()
        return loss, logs

    @torch.no_grad()
    def after_step(self, step):
        if step == self.prune_at:
            for name, m in self._linears():
                k = int(self.sparsity * m.weight.numel())
                thresh = m.weight.abs().flatten().kthvalue(k).values if k else -1.0
                self.masks[name] = (m.weight.abs() > thresh)
        for name, m in self._linears():
            if name in self.masks:
                m.weight.mul_(self.masks[name])
        return {"sparsity": self.sparsity if self.masks else 0.0} if step == self.prune_at else {}

    def state_dict(self):
        return {"masks": {k: v.to(torch.uint8) for k, v in self.masks.items()}}

    def load_state_dict(self, state):
        self.masks = {k: v.bool() for k, v in state["masks"].items()}


if MagnitudeDistill.name not in METHODS:
    register_method(MagnitudeDistill)


def run_cli_subprocess(args: list[str], env: dict | None = None, cwd=None):
    """`python -m sparsebert.train <args>` in a fresh process that knows the test method."""
    import subprocess
    code = ("import sys; sys.path.insert(0, %r); import _train_fixtures; from sparsebert.train import main; "
            "sys.exit(main(sys.argv[1:]))" % str(Path(__file__).parent))
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
