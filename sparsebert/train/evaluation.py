"""Evaluation loops: a task's dev metrics, masked-LM loss on held-out text, and likeness of an
encoder's representations to a dense reference.

Under torchrun the ranks share the evaluation batches of a single process (round-robin) and gather
their per-batch results in order, so the metrics are those of the single-process evaluation."""
from __future__ import annotations

import numpy as np
import torch

from ..data import collate as D
from ..data import glue
from ..data import metrics as M
from ..objectives import model_inputs
from .distributed import shard_map
from .runtime import autocast, move


def _chunks(features: list, size: int):
    for s in range(0, len(features), size):
        yield features[s:s + size]


def eval_task(model, task: glue.Task, dev: dict[str, list], pad_id: int, bs: int, device, precision: str) -> dict:
    """GLUE metrics of every dev split (`<split>/<metric>`) and the task's main `score`."""
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    def predict(chunk):
        batch = move(D.collate(chunk, pad_id, "representation"), device)
        logits = model(**model_inputs(batch)).logits.float()
        return (logits[:, 0] if task.labels is None else logits.argmax(-1)).cpu()

    with torch.no_grad(), autocast(device, precision):
        for split, feats in dev.items():
            preds = torch.cat(shard_map(list(_chunks(feats, bs)), predict)).numpy()
            labels = np.array([f["label"] for f in feats])
            for name, value in M.compute(task.metrics, preds, labels).items():
                out[f"{split}/{name}"] = value
    out["score"] = glue.main_score(task, out)
    model.train(was_training)
    return out


def eval_mlm(model, blocks: list, tokenizer, bs: int, device, precision: str, probability: float, seed: int) -> dict:
    """Masked-LM loss (and perplexity) over held-out blocks, with the same corruption at every evaluation."""
    gen = torch.Generator().manual_seed(seed)
    # the corruption of every batch in order (one generator), whichever rank evaluates it
    batches = [D.mask_tokens(D.collate(chunk, tokenizer.pad_token_id, "representation"), tokenizer, probability, gen)
               for chunk in _chunks(blocks, bs)]

    def loss_sum(batch):
        batch = move(batch, device)
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100,
                                                 reduction="sum")
        return loss.item(), int((labels != -100).sum())

    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        for loss, n in shard_map(batches, loss_sum):
            total += loss
            count += n
    mean = total / max(1, count)
    return {"eval/mlm_loss": mean, "eval/perplexity": float(np.exp(min(mean, 50.0)))}


def eval_representation(model, reference, blocks: list, pad_id: int, bs: int, device, precision: str) -> dict:
    """Cosine and MSE between the model's last hidden states and the reference's, over real tokens."""
    def sums(chunk):
        batch = move(D.collate(chunk, pad_id, "representation"), device)
        inputs = model_inputs(batch)
        hs = model(**inputs).last_hidden_state.float()
        ht = reference(**inputs).last_hidden_state.float()
        keep = batch["attention_mask"].bool()
        return (torch.nn.functional.cosine_similarity(hs, ht, dim=-1)[keep].sum().item(),
                ((hs - ht) ** 2).mean(-1)[keep].sum().item(), int(keep.sum()))

    cos_sum, mse_sum, count = 0.0, 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        for cos, mse, n in shard_map(list(_chunks(blocks, bs)), sums):
            cos_sum += cos
            mse_sum += mse
            count += n
    return {"eval/cosine": cos_sum / count, "eval/hidden_mse_loss": mse_sum / count}


#: What a representation model scores against itself (the reference row of an upstream report).
REPRESENTATION_SELF = {"eval/cosine": 1.0, "eval/hidden_mse_loss": 0.0}
