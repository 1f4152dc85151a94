"""Bad input is refused with a clear message before any work starts (no run dir is made)."""
import shutil

import pytest

from _train_fixtures import make_model, write_corpus, write_glue
from sparsebert.train import main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return {"root": root, "mlm": make_model(root / "tiny-mlm"), "glue": write_glue(root / "glue", 8, 4),
            "corpus": write_corpus(root / "corpus.txt", 10)}


def refused(capsys, argv, message, run_dir=None):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if run_dir is not None:
        assert not run_dir.exists()
    return err


def base(env, stage, run_dir, *extra):
    return [stage, "--model", str(env["mlm"]), "--data-dir", str(env["glue"]), "--task", "rte",
            "--cache-dir", str(env["root"] / "cache"), "--run-dir", str(run_dir), "--max-len", "16",
            "--batch-size", "4", "--threads", "1", "--method", "dense", *extra]


@pytest.mark.parametrize("case,extra,message", [
    ("task", ["--task", "glue-nope"], "unknown task 'glue-nope'"),
    ("method", ["--method", "magic"], "unknown method 'magic'"),
    ("method-kwargs", ["--method", "dense", "--set", "method.nonsense=1"], "does not take these settings"),
    ("distill-kwargs", ["--method", "sparsebert-kap", "--set", "method.distill.hiden=1"],
     "unknown distill options ['hiden']"),
    ("model-dir", ["--model", "/nonexistent/model-dir"], "model '/nonexistent/model-dir': no such dir"),
    ("model-rel-dir", ["--model", "runs/x/model"], "model 'runs/x/model': no such dir"),
    ("hub-name", ["--model", "nobody/no-such-model"], "cannot be loaded by transformers"),
    ("data-dir", ["--data-dir", "/nonexistent/glue"], "data dir /nonexistent/glue does not exist"),
    ("data-dir-file", ["--data-dir", __file__], "is a file; --data-dir takes the dir holding <TASK>/train.tsv"),
    ("sparsity-high", ["--set", "method.final_sparsity=1.0"], "method.final_sparsity must be a sparsity in [0, 1)"),
    ("sparsity-low", ["--set", "method.initial_sparsity=-0.1"], "must be a sparsity in [0, 1)"),
    ("key", ["--set", "training.lrr=1"], "unknown config key 'training.lrr'"),
    ("precision", ["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
])
def test_refused_before_work(env, capsys, tmp_path, case, extra, message):
    run = tmp_path / "run"
    refused(capsys, base(env, "downstream", run, *extra), message, run)


def test_model_dir_without_config(env, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(capsys, base(env, "teacher", tmp_path / "run", "--model", str(tmp_path / "empty")), "has no config.json",
            tmp_path / "run")


def test_missing_task_files_and_corpus(env, capsys, tmp_path):
    refused(capsys, base(env, "teacher", tmp_path / "run", "--data-dir", str(tmp_path)), "no GLUE files for task rte")
    refused(capsys, base(env, "upstream", tmp_path / "run", "--method", "dense", "--corpus", str(tmp_path / "no.txt")),
            "no such file or dir", tmp_path / "run")


def test_resume_from_different_config_and_corrupted_checkpoint(env, capsys, tmp_path):
    run = tmp_path / "run"
    assert main(base(env, "teacher", run, "--max-steps", "2")) == 0
    capsys.readouterr()
    refused(capsys, ["teacher", "--resume", str(run), "--lr", "1e-3", "--model", str(env["mlm"]),
                     "--data-dir", str(env["glue"]), "--task", "rte"], "was made with a different config")
    refused(capsys, ["upstream", "--resume", str(run)], "is a teacher run, not upstream")
    refused(capsys, ["--resume", str(tmp_path / "nothing")], "does not exist")
    # an unfinished run whose checkpoint was damaged on disk
    (run / "done.json").unlink()
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    good = (ckpt / "model.safetensors").read_bytes()
    data = bytearray(good)
    data[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    refused(capsys, ["--resume", str(run)], "model.safetensors fails its sha256 check")
    (ckpt / "model.safetensors").write_bytes(good)
    (ckpt / "optimizer.safetensors").write_bytes(b"short")
    refused(capsys, ["--resume", str(run)], "optimizer.safetensors has 5 bytes")
    shutil.rmtree(ckpt)
    refused(capsys, ["--resume", str(run)], "is missing")


def test_task_by_name_needs_datasets(env, capsys, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    argv = [a for a in base(env, "teacher", tmp_path / "run") if a != str(env["glue"]) and a != "--data-dir"]
    refused(capsys, argv, "no --data-dir given and the `datasets` package is not installed", tmp_path / "run")


def test_dense_upstream_without_mlm_head(env, capsys, tmp_path):
    enc = make_model(tmp_path / "enc", mlm=False)
    run = tmp_path / "run"
    refused(capsys, ["pipeline", "--model", str(enc), "--method", "dense", "--corpus", str(env["corpus"]),
                     "--tasks", "rte", "--data-dir", str(env["glue"]), "--run-dir", str(run)],
            "needs a model with an MLM head", run)


@pytest.mark.parametrize("method,missing", [("sparsebert-kap", "--teacher DIR"), ("cap", "--teacher DIR")])
def test_method_without_its_teacher(env, capsys, tmp_path, method, missing):
    run = tmp_path / "run"
    argv = [a if a != "dense" else method for a in base(env, "downstream", run)]
    err = refused(capsys, argv, f"method {method!r} trains against the teacher model", run)
    assert missing in err


def test_evaluate_representation_without_teacher(env, capsys, tmp_path):
    enc = make_model(tmp_path / "enc", mlm=False)
    run = tmp_path / "run"
    refused(capsys, ["evaluate", "--model", str(enc), "--corpus", str(env["corpus"]), "--run-dir", str(run)],
            "pass --teacher <dense model>", run)


@pytest.mark.parametrize("name,text,message", [
    ("empty", "", "train.tsv: empty file"),
    ("header-only", "index\tsentence1\tsentence2\tlabel\n", "train.tsv: no examples"),
    ("no-column", "index\tsentence1\tsentence2\n0\ta\tb\n", "train.tsv:1: expected a column 'label'"),
    ("bad-label", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", "train.tsv:3: label 'maybe'"),
])
def test_bad_data_content_is_refused_before_the_run_dir(env, capsys, tmp_path, name, text, message):
    data = tmp_path / "glue"
    (data / "RTE").mkdir(parents=True)
    (data / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    (data / "RTE" / "train.tsv").write_text(text)
    err = refused(capsys, base(env, "teacher", tmp_path / "run", "--data-dir", str(data)), message, tmp_path / "run")
    assert err.count("\n") == 1 and err.startswith("error: ")  # one line, no traceback


@pytest.mark.parametrize("text", ["", "\n\n   \n"])
def test_an_empty_corpus_is_refused_before_the_run_dir(env, capsys, tmp_path, text):
    corpus = tmp_path / "empty.txt"
    corpus.write_text(text)
    refused(capsys, base(env, "upstream", tmp_path / "run", "--corpus", str(corpus)), "no text", tmp_path / "run")


def test_glue_by_name_fails_fast_offline(env, capsys, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import time
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    argv = base(env, "teacher", tmp_path / "run")
    del argv[argv.index("--data-dir"):argv.index("--data-dir") + 2]
    started = time.time()
    refused(capsys, argv, "pass --data-dir", tmp_path / "run")
    assert time.time() - started < 30
