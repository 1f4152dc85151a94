"""A run killed with SIGKILL (mid-stage, or halfway through writing a checkpoint) and resumed ends
with the same weights, masks and metrics as the uninterrupted run with the same seed."""
import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from _train_fixtures import make_model, run_cli_subprocess, write_corpus, write_glue
from sparsebert.methods import METHODS
from sparsebert.train import main

STAGES = ["teacher-sst2", "upstream", "downstream-sst2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"root": root, "mlm": make_model(root / "tiny-mlm"), "glue": write_glue(root / "glue"),
            "corpus": write_corpus(root / "corpus.txt")}


# the library's method once merged (its masks, scores and optimizer state must survive a kill), else the test's
METHOD = "prune-ofa" if "prune-ofa" in METHODS else "test-magnitude"


def args(env, run_dir):
    extra = ["method.prune_at=1"] if METHOD == "test-magnitude" else []
    return ["pipeline", "--model", str(env["mlm"]), "--method", METHOD, "--corpus", str(env["corpus"]),
            "--tasks", "sst2", "--data-dir", str(env["glue"]), "--cache-dir", str(env["root"] / "cache"),
            "--run-dir", str(run_dir), "--max-len", "16", "--batch-size", "4", "--threads", "1", "--max-steps", "6",
            "--set", "training.checkpoint_every=2", "training.eval_every=2", "training.log_every=1",
            "training.group_by_length=true", "method.sparsity=0.6", *extra]


def final_state(run_dir, stage):
    ckpt = run_dir / stage / "checkpoints" / (run_dir / stage / "checkpoints" / "latest").read_text()
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "method.safetensors"), \
        json.loads((ckpt / "method.json").read_text())


def metrics(run_dir, stage):
    return [json.loads(l) for l in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(env):
    run = env["root"] / "uninterrupted"
    assert main(args(env, run)) == 0
    return run


def test_killed_three_times_and_resumed_equals_uninterrupted(env, reference):
    """SIGKILL mid-stage, then halfway through writing a checkpoint, then before a stage's first
    checkpoint; each time `--resume`; the end state equals the uninterrupted run's."""
    run = env["root"] / "killed"
    ckpts = run / "upstream" / "checkpoints"
    proc = run_cli_subprocess(args(env, run), env={"SPARSEBERT_KILL_AT": "upstream@step:3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / "teacher-sst2" / "done.json").is_file() and not (run / "upstream" / "done.json").exists()
    assert (ckpts / "latest").read_text() == "step-00000002"

    proc = run_cli_subprocess(["--resume", str(run)], env={"SPARSEBERT_KILL_AT": "upstream@checkpoint:4"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "teacher-sst2: done earlier" in proc.stdout and "resumed from" in proc.stdout
    # the half-written checkpoint is a temp dir; `latest` still names the last whole one
    assert (ckpts / "latest").read_text() == "step-00000002" and list(ckpts.glob(".step-00000004.*.tmp"))

    proc = run_cli_subprocess(["--resume", str(run)], env={"SPARSEBERT_KILL_AT": "downstream-sst2@step:1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    down = run / "downstream-sst2"
    assert (run / "upstream" / "done.json").is_file() and not (down / "checkpoints" / "latest").exists()
    assert (down / "metrics.jsonl").is_file()  # it logged step 1, which the resume must forget

    proc = run_cli_subprocess(["--resume", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(ckpts.glob(".step-*.tmp"))
    for stage in STAGES:
        model_a, masks_a, meta_a = final_state(reference, stage)
        model_b, masks_b, meta_b = final_state(run, stage)
        assert model_a.keys() == model_b.keys()
        for k in model_a:
            assert torch.equal(model_a[k], model_b[k]), (stage, k)
        assert meta_a == meta_b and masks_a.keys() == masks_b.keys()
        for k in masks_a:
            assert torch.equal(masks_a[k], masks_b[k]), (stage, k)
        assert metrics(reference, stage) == metrics(run, stage), stage
        done_a = json.loads((reference / stage / "done.json").read_text())
        done_b = json.loads((run / stage / "done.json").read_text())
        assert done_a["final"] == done_b["final"] and done_a["sparsity"] == done_b["sparsity"]
    assert json.loads((reference / "upstream" / "done.json").read_text())["sparsity"]["overall"] == \
        pytest.approx(0.6, abs=0.01)
