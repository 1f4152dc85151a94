"""sparsebert methods in the transformers Trainer (sparsebert.integrations.hf_trainer): a tiny BERT
pruned to 90% with sparsebert-kap through Trainer ends with exact sparsity, no revived weight and the
masks of sparsebert's own CLI on the same data, seed and steps; the bare callback with the Trainer's
default optimizer; checkpoints and resume."""
import json
import warnings

import pytest
import torch

pytest.importorskip("accelerate")

from _train_fixtures import SPECIAL, WORDS, write_glue  # noqa: E402
from conftest import kept_oracle  # noqa: E402
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,  # noqa: E402
                          BertTokenizer, Trainer, TrainerCallback, TrainingArguments)

import sparsebert  # noqa: E402
from sparsebert.data import collate as D  # noqa: E402
from sparsebert.data import glue  # noqa: E402
from sparsebert.data.order import epoch_order  # noqa: E402
from sparsebert.integrations.hf_trainer import STATE_FILE, PruningCallback, PruningTrainer  # noqa: E402
from sparsebert.sparsity import masked_modules  # noqa: E402
from sparsebert.zeros import UnmaskedOptimizerWarning  # noqa: E402

STEPS, BATCH, MAX_LEN, SEED = 12, 4, 16, 0


def save_classifier(path, seed):
    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    BertTokenizer(vocab=vocab).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"root": root, "student": save_classifier(root / "student", 0), "teacher": save_classifier(root / "teacher", 1),
            "glue": write_glue(root / "glue", n_train=STEPS * BATCH)}


def features(env):
    """SST-2's training features as the CLI builds them (sparsebert.data)."""
    tokenizer = BertTokenizer.from_pretrained(env["student"])
    task = glue.get_task("sst2")
    examples = glue.load_split(task, env["glue"], "train")
    return D.tokenize_examples(examples, tokenizer, MAX_LEN, "hf-test", None), tokenizer.pad_token_id


class CLIOrder(torch.utils.data.Sampler):
    """The CLI's epoch order (sparsebert.data.order), so that both loops see the same batches."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(epoch_order(self.n, SEED, 0, None, BATCH).tolist())


def trainer_kwargs(env, out, **args):
    feats, pad = features(env)
    args = {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": BATCH, "seed": SEED,
            "use_cpu": True, "report_to": [], "save_strategy": "no", "logging_strategy": "no",
            "dataloader_num_workers": 0, **args}
    return {"args": TrainingArguments(**args), "train_dataset": feats,
            "data_collator": lambda batch: D.collate(batch, pad, "classification")}


def load(path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def revived(model):
    return sum(int(((m.weight != 0) & ~m.dense_mask()).sum()) for m in masked_modules(model).values())


def test_sparsebert_kap_through_trainer_matches_the_cli(env, tmp_path):
    from sparsebert.train import main
    torch.set_num_threads(1)
    run = tmp_path / "cli"
    assert main(["downstream", "--model", str(env["student"]), "--teacher", str(env["teacher"]), "--method",
                 "sparsebert-kap", "--task", "sst2", "--data-dir", str(env["glue"]), "--run-dir", str(run),
                 "--max-len", str(MAX_LEN), "--batch-size", str(BATCH), "--max-steps", str(STEPS), "--seed", str(SEED),
                 "--threads", "1", "--lr", "3e-3", "--set", "training.group_by_length=false"]) == 0
    training = json.loads((run / "config.json").read_text())["config"]["training"]
    cli_model = load(run / "model")  # the export: pruned weights stored as zeros

    class OrderedTrainer(PruningTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return CLIOrder(len(self.train_dataset))

    torch.set_num_threads(1)
    student, teacher = load(env["student"]), load(env["teacher"])
    pruning = sparsebert.Pruning("sparsebert-kap", teacher=teacher)
    trainer = OrderedTrainer(model=student, pruning=pruning, **trainer_kwargs(
        env, tmp_path / "hf", learning_rate=training["lr"], weight_decay=training["weight_decay"],
        max_grad_norm=training["grad_clip"]))
    trainer.train()

    modules = masked_modules(student)
    assert sum(m.nnz() for m in modules.values()) == sum(kept_oracle(m.weight.numel(), 0.9) for m in modules.values())
    assert revived(student) == 0
    for name, module in modules.items():
        assert torch.equal(module.dense_mask(), cli_model.get_submodule(name).weight != 0), name
        torch.testing.assert_close(module.weight, cli_model.get_submodule(name).weight)
    plain = load(pruning.export(tmp_path / "export"))
    assert all(torch.equal(plain.get_submodule(n).weight != 0, m.dense_mask()) for n, m in modules.items())


def test_the_bare_callback_with_the_trainers_default_optimizer(env, tmp_path):
    student = load(env["student"])
    pruning = sparsebert.Pruning("gradual-magnitude", sparsity=0.9)
    trainer = Trainer(model=student, callbacks=[PruningCallback(pruning)],
                      **trainer_kwargs(env, tmp_path / "cb", remove_unused_columns=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    warned = [w for w in caught if issubclass(w.category, UnmaskedOptimizerWarning)]
    assert len(warned) == 1 and "MaskedAdamW" in str(warned[0].message)
    assert revived(student) == 0 and pruning.step_count == STEPS
    modules = masked_modules(student)
    assert sum(m.nnz() for m in modules.values()) == sum(kept_oracle(m.weight.numel(), 0.9) for m in modules.values())


@pytest.mark.parametrize("method", ["sparsebert-kap", "cap", "prune-ofa"])
def test_the_bare_callback_refuses_a_method_it_cannot_train_before_any_change(env, tmp_path, method):
    kw = {"stage": "downstream"} if method == "prune-ofa" else {}
    pruning = sparsebert.Pruning(method, teacher=load(env["teacher"]), pretrained=load(env["student"]).bert, **kw)
    student = load(env["student"])
    with pytest.raises(ValueError, match="PruningTrainer"):
        Trainer(model=student, callbacks=[PruningCallback(pruning)],
                **trainer_kwargs(env, tmp_path / "refused", remove_unused_columns=False))
    assert masked_modules(student) == {}


class StopAt(TrainerCallback):
    """Interrupts a run after `step` (its checkpoint is saved first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_checkpoints_hold_the_method_state_and_resume_exactly(env, tmp_path):
    def trainer(out, callbacks=()):
        pruning = sparsebert.Pruning("cap", teacher=load(env["teacher"]), pretrained=load(env["student"]).bert)
        return PruningTrainer(model=load(env["student"]), pruning=pruning, callbacks=list(callbacks), **trainer_kwargs(
            env, out, save_strategy="steps", save_steps=STEPS // 2))

    whole = trainer(tmp_path / "whole")
    whole.train()
    trainer(tmp_path / "cut", [StopAt(STEPS // 2)]).train()
    assert (tmp_path / "cut" / f"checkpoint-{STEPS // 2}" / STATE_FILE).is_file()
    resumed = trainer(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.pruning.step_count == STEPS
    got, want = masked_modules(resumed.model), masked_modules(whole.model)
    for name in got:
        assert torch.equal(got[name].mask, want[name].mask), name
        torch.testing.assert_close(got[name].weight, want[name].weight)
        torch.testing.assert_close(got[name].scores, want[name].scores)


@pytest.mark.parametrize("own_trainer", [True, False])
def test_obert_sees_the_gradients_of_every_optimizer_step(env, tmp_path, own_trainer, monkeypatch):
    """The oBERT criterion's Fisher is fed by the optimizer's step, whichever loop and optimizer: the
    PruningTrainer's MaskedAdamW and the Trainer's own AdamW under the bare callback."""
    from sparsebert.sparsity.fisher import BlockFisher
    seen = []
    add = BlockFisher.add
    monkeypatch.setattr(BlockFisher, "add", lambda self, grad: (seen.append(grad.abs().sum() > 0), add(self, grad))[1])
    student = load(env["student"])
    pruning = sparsebert.Pruning("gradual-magnitude", sparsity=0.9, criterion="obert", criterion_kwargs={"block": 8})
    kwargs = trainer_kwargs(env, tmp_path / "obert", remove_unused_columns=False)
    if own_trainer:
        trainer = PruningTrainer(model=student, pruning=pruning, **kwargs)
    else:
        trainer = Trainer(model=student, callbacks=[PruningCallback(pruning)], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmaskedOptimizerWarning)
        trainer.train()
    modules = masked_modules(student)
    assert len(seen) == pruning.method.pruner.schedule.end * len(modules) and all(seen)
    assert sum(m.nnz() for m in modules.values()) == sum(kept_oracle(m.weight.numel(), 0.9) for m in modules.values())
    assert revived(student) == 0
