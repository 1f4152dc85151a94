"""Every stage and the pipeline end to end on a tiny BERT and tiny GLUE files; report numbers."""
import json

import pytest
import yaml

from _train_fixtures import make_model, write_corpus, write_glue
from sparsebert.train import main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return {"root": root, "mlm": make_model(root / "tiny-mlm"), "enc": make_model(root / "tiny-enc", mlm=False),
            "glue": write_glue(root / "glue"), "corpus": write_corpus(root / "corpus.txt")}


def common(env, run_dir):
    return ["--data-dir", str(env["glue"]), "--cache-dir", str(env["root"] / "cache"), "--run-dir", str(run_dir),
            "--max-len", "16", "--batch-size", "4", "--threads", "1", "--set", "training.eval_batch_size=8", "training.log_every=1"]


def table_rows(report: str) -> list[list[str]]:
    """Data rows of the first table after '## Results'."""
    section = report.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [l for l in section.splitlines() if l.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return header, [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def check_report(run_dir, results):
    report = (run_dir / "report.md").read_text()
    header, rows = table_rows(report)
    final = results["final"]
    sparse_row = rows[-1]
    for key, value in final.items():
        if "/" in key:
            assert sparse_row[header.index(key)] == f"{value:.4f}", (key, report)
    assert sparse_row[header.index("sparsity")] == f"{results['sparsity']['overall']:.4f}"
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "eval"]
    assert {k: v for k, v in evals[-1].items() if "/" in k} == {k: v for k, v in final.items() if "/" in k}
    for png in ("loss.png", "sparsity.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert "## Per-layer sparsity" in report
    return report


def test_teacher(env):
    run = env["root"] / "teacher"
    assert main(["teacher", "--model", str(env["mlm"]), "--task", "sst2", "--epochs", "2", *common(env, run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["stage"] == "teacher" and cfg["method"]["name"] == "dense" and cfg["training"]["epochs"] == 2
    results = json.loads((run / "done.json").read_text())
    assert results["steps"] == 12 and results["objective"] == "classification"
    check_report(run, results)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "optimizer.safetensors", "manifest.json",
                                                "trainer.json", "rng.safetensors", "method.json"}
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert model.config.num_labels == 2


def test_upstream_mlm_dense(env):
    run = env["root"] / "up-mlm"
    assert main(["upstream", "--model", str(env["mlm"]), "--method", "dense", "--corpus", str(env["corpus"]),
                 "--max-steps", "4", *common(env, run)]) == 0
    results = json.loads((run / "done.json").read_text())
    assert results["objective"] == "mlm" and "eval/mlm_loss" in results["final"]
    assert results["reference"]["model"] == "dense pre-trained"
    check_report(run, results)
    from transformers import AutoModelForMaskedLM
    AutoModelForMaskedLM.from_pretrained(run / "model")
    ev = env["root"] / "eval-mlm"
    assert main(["evaluate", "--model", str(run / "model"), "--corpus", str(env["corpus"]), *common(env, ev)]) == 0
    evaluated = json.loads((ev / "done.json").read_text())
    assert evaluated["objective"] == "mlm"
    assert evaluated["final"]["eval/mlm_loss"] == pytest.approx(results["final"]["eval/mlm_loss"], rel=1e-5)


def test_upstream_representation_prunes(env):
    run = env["root"] / "up-rep"
    assert main(["upstream", "--model", str(env["enc"]), "--method", "test-magnitude", "--corpus", str(env["corpus"]),
                 "--max-steps", "5", "--set", "method.sparsity=0.5", *common(env, run)]) == 0
    results = json.loads((run / "done.json").read_text())
    assert results["objective"] == "representation" and "eval/cosine" in results["final"]
    assert results["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert all(v == pytest.approx(0.5, abs=0.02) for v in results["sparsity"]["layers"].values())
    report = check_report(run, results)
    assert "| 1 | 0.50" in report  # per-layer table


def test_downstream_and_evaluate(env):
    teacher = env["root"] / "teacher" / "model"
    if not teacher.exists():
        pytest.skip("needs test_teacher's output")
    run = env["root"] / "down"
    assert main(["downstream", "--model", str(env["mlm"]), "--teacher", str(teacher), "--task", "sst2",
                 "--method", "test-magnitude", "--max-steps", "6", "--set", "method.sparsity=0.75",
                 *common(env, run)]) == 0
    results = json.loads((run / "done.json").read_text())
    assert results["reference"]["model"] == "teacher" and results["sparsity"]["overall"] == pytest.approx(0.75, abs=0.01)
    report = check_report(run, results)
    header, rows = table_rows(report)
    assert rows[0][2].startswith("dense") and rows[0][header.index("dev/accuracy")] == \
        f"{results['reference']['dev/accuracy']:.4f}"
    ev = env["root"] / "eval"
    assert main(["evaluate", "--model", str(run / "model"), "--task", "sst2", *common(env, ev)]) == 0
    evaluated = json.loads((ev / "done.json").read_text())
    assert evaluated["final"]["dev/accuracy"] == pytest.approx(results["final"]["dev/accuracy"])
    assert evaluated["sparsity"]["overall"] == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("method", ["dense", "test-magnitude"])
def test_pipeline(env, method):
    run = env["root"] / f"pipe-{method}"
    assert main(["pipeline", "--model", str(env["mlm"]), "--method", method, "--corpus", str(env["corpus"]),
                 "--tasks", "sst2,rte", "--max-steps", "3", "--set", "method.prune_at=1" if method != "dense"
                 else "training.seed=3", *common(env, run)]) == 0
    names = ["teacher-sst2", "teacher-rte", "upstream", "downstream-sst2", "downstream-rte"]
    for name in names:
        assert (run / name / "done.json").is_file() and (run / name / "report.md").is_file()
    down = yaml.safe_load((run / "downstream-rte" / "config.yaml").read_text())
    assert down["model"]["name"] == str(run / "upstream" / "model")
    assert down["model"]["teacher"] == str(run / "teacher-rte" / "model")
    summary = json.loads((run / "done.json").read_text())
    assert list(summary["stages"]) == names
    report = (run / "report.md").read_text()
    for name in ("downstream-sst2", "downstream-rte", "upstream"):
        res = summary["stages"][name]
        for key, value in res["final"].items():
            if "/" in key:
                assert f"{value:.4f}" in report
    # a finished pipeline resumed does nothing and keeps its results
    assert main(["--resume", str(run)]) == 0
    assert json.loads((run / "done.json").read_text()) == summary


def test_bf16_autocast_on_cpu(env):
    run = env["root"] / "bf16"
    assert main(["teacher", "--model", str(env["mlm"]), "--task", "stsb", "--max-steps", "2", "--precision", "bf16",
                 *common(env, run)]) == 0
    results = json.loads((run / "done.json").read_text())
    assert results["objective"] == "regression" and {"dev/pearson", "dev/spearman"} <= set(results["final"])
