"""What a run keeps and says: checkpoints once a stage is done, a time limit that cuts a stage short
(and its report says so), the time of a resumed run, the metric plot against the dense reference."""
import json
import signal

import pytest

from _train_fixtures import make_model, run_cli_subprocess, write_glue
from sparsebert.train import main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"root": root, "mlm": make_model(root / "tiny-mlm"), "glue": write_glue(root / "glue", n_train=48)}


def teacher(env, run_dir, *extra):
    return ["teacher", "--model", str(env["mlm"]), "--task", "sst2", "--data-dir", str(env["glue"]),
            "--cache-dir", str(env["root"] / "cache"), "--run-dir", str(run_dir), "--max-len", "16",
            "--batch-size", "4", "--threads", "1", "--epochs", "1", *extra]


@pytest.mark.parametrize("keep,expected", [(0, 0), (1, 1), (3, 3)])
def test_checkpoints_kept_once_the_stage_is_done(env, tmp_path, keep, expected):
    run = tmp_path / "run"
    assert main(teacher(env, run, "--keep-checkpoints", str(keep), "--set", "training.checkpoint_every=2")) == 0
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []
    assert len(kept) == expected and (run / "model" / "config.json").is_file()
    if expected:
        assert kept[-1] == "step-00000012" and (run / "checkpoints" / "latest").read_text() == kept[-1]


def test_a_time_limit_cuts_the_stage_and_the_report_says_so(env, tmp_path):
    run = tmp_path / "run"
    assert main(teacher(env, run, "--time-limit", "1e-9")) == 0
    results = json.loads((run / "done.json").read_text())
    assert results["steps"] == 1 and results["planned_steps"] == 12
    assert results["stopped"].startswith("time limit of 1e-09 s")
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals[-1]["step"] == 1 and results["final"]["dev/accuracy"] == evals[-1]["dev/accuracy"]
    report = (run / "report.md").read_text()
    assert "Training stopped early, at step 1 of 12: time limit of 1e-09 s reached" in report


def test_the_metric_plot_and_the_reference_line(env, tmp_path):
    run = tmp_path / "run"
    assert main(teacher(env, run, "--set", "training.eval_every=4")) == 0
    assert (run / "metric.png").read_bytes()[:4] == b"\x89PNG" and "![metric](metric.png)" in (run / "report.md").read_text()


def test_a_resumed_run_reports_the_time_of_both_parts(env, tmp_path):
    run = tmp_path / "run"
    argv = teacher(env, run, "--set", "training.checkpoint_every=6", "--epochs", "2")
    proc = run_cli_subprocess(argv, env={"SPARSEBERT_KILL_AT": "step:18"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    before = json.loads((ckpt / "trainer.json").read_text())["time_s"]
    assert before > 0
    proc = run_cli_subprocess(["--resume", str(run)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "done.json").read_text())["time_s"] > before


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bad_thread_counts_are_refused_before_the_run_dir(env, tmp_path, capsys, threads):
    run = tmp_path / "run"
    argv = teacher(env, run)
    argv[argv.index("--threads") + 1] = threads
    assert main(argv) == 2
    assert "run.threads (--threads) must be a positive integer" in capsys.readouterr().err and not run.exists()


def test_quiet_and_verbose(env, tmp_path, capsys):
    assert main(teacher(env, tmp_path / "a", "--max-steps", "2")) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "run dir:" in out and "eval: dev/accuracy" in out
    assert main(teacher(env, tmp_path / "b", "--max-steps", "2", "--quiet")) == 0
    captured = capsys.readouterr()
    assert "plan:" not in captured.out and "eval:" not in captured.out and "teacher-sst2" not in captured.err
