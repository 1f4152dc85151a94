"""benchmarks/bench_methods.py: its method specs, its summary table and its plot, without training."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_methods  # noqa: E402

ROWS = [
    {"method": "dense", "target": 0.0, "seed": 0, "dev_acc": 0.9, "wall_s": 60.0, "threads": 2},
    {"method": "oneshot-magnitude", "target": 0.9, "seed": 0, "dev_acc": 0.8, "wall_s": 120.0, "threads": 1},
    {"method": "oneshot-magnitude", "target": 0.9, "seed": 1, "dev_acc": 0.84, "wall_s": 180.0, "threads": 1},
    {"method": "cap[criterion=magnitude]", "target": 0.8, "seed": 0, "dev_acc": 0.855, "wall_s": 300.0, "threads": 1},
]


def test_parse_method_reads_nested_overrides():
    name, overrides = bench_methods.parse_method("sparsebert-kap[distill.hidden=0,end_frac=0.3,schedule=one-shot]")
    assert name == "sparsebert-kap"
    assert overrides == {"distill": {"hidden": 0}, "end_frac": 0.3, "schedule": "one-shot"}
    assert bench_methods.parse_method("cap") == ("cap", {})


@pytest.mark.parametrize("spec", ["magnitude", "cap[criterion]", "cap[", "cap[=1]x", "cap[=1]", "cap[distill.=1]"])
def test_parse_method_refuses_bad_specs(spec):
    with pytest.raises(ValueError):
        bench_methods.parse_method(spec)


@pytest.mark.parametrize("spec", ["cap[nonsense=1]", "sparsebert-kap[distill.nonsense=1]", "prune-ofa[stage=sideways]"])
def test_main_refuses_an_unknown_option_before_loading_anything(spec, monkeypatch, capsys):
    monkeypatch.setattr(bench_methods, "run_stage_dir", lambda *a: pytest.fail("trained before checking the specs"))
    with pytest.raises(SystemExit) as exit_info:
        bench_methods.main(["--methods", spec])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_summary_means_seeds_against_dense():
    lines = bench_methods.summary(ROWS).splitlines()
    assert lines[2] == "| dense | 0% | 1 | 0.900 | 0.900 | 100.0% | 1.0 min (2 threads) |"
    assert lines[3] == "| oneshot-magnitude | 90% | 2 | 0.800, 0.840 | 0.820 | 91.1% | 2.5 min (1 thread) |"
    assert lines[4] == "| cap[criterion=magnitude] | 80% | 1 | 0.855 | 0.855 | 95.0% | 5.0 min (1 thread) |"


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "runs.png"
    bench_methods.plot(ROWS, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
