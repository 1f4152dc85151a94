"""A tiny BERT for the sparsity tests (no downloads), and batches for it."""
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from sparsebert.methods import MethodContext

VOCAB = 64


def config(**overrides) -> BertConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    return BertConfig(**kw)


def classifier(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(config(**overrides))


def encoder(seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(config(**overrides))


def batch(step: int, size: int = 4, length: int = 8, train_size: int = 16, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(step)
    b = {
        "input_ids": torch.randint(1, VOCAB, (size, length), generator=g),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "token_type_ids": torch.zeros(size, length, dtype=torch.long),
        "index": (torch.arange(size) + step * size) % train_size,
    }
    b["attention_mask"][0, -2:] = 0  # one padded example
    if labels:
        b["labels"] = torch.randint(0, 2, (size,), generator=g)
    return b


def context(student, teacher=None, pretrained=None, objective="classification", total_steps=10, train_size=16):
    return MethodContext(student=student, teacher=teacher, pretrained=pretrained, objective=objective,
                         num_labels=2 if objective == "classification" else 0, total_steps=total_steps,
                         steps_per_epoch=max(1, train_size // 4), train_size=train_size, device=torch.device("cpu"))


def train(method, ctx, steps: int, lr: float = 1e-3, check=None, labels: bool = True) -> list[dict]:
    """The trainer's side of the contract, minimally: loss, backward, step, after_step."""
    method.setup(ctx)
    opt = method.optimizer(lr, 0.01)
    logs = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = method.lr_at(step, lr)  # as the trainer does: lr_scale is applied in the step
        loss, info = method.training_loss(batch(step, train_size=ctx.train_size, labels=labels), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        info.update(method.after_step(step))
        logs.append(info)
        if check is not None:
            check(method, step)
    return logs
