"""Config layers: defaults < stage defaults < recipe < command line; overrides parsed; resolved config saved."""
import pytest

from sparsebert.train import cli
from sparsebert.train import config as C
from sparsebert.train import pipeline


@pytest.fixture
def recipe(monkeypatch):
    recipes = {("prune-ofa", "downstream-qat"): {"method": {"name": "prune-ofa", "quantize": True}},
               ("prune-ofa", "downstream"): {"method": {"name": "prune-ofa", "final_sparsity": 0.85, "rewind": True},
                                               "training": {"lr": 2e-5, "epochs": 4.0}}}
    monkeypatch.setattr(C, "load_recipe", lambda m, s: recipes.get((m, s), {}))


def overrides(argv):
    args, extra = cli.build_parser().parse_known_args(argv)
    return cli.user_overrides(args, extra)


def test_defaults_only(monkeypatch):
    monkeypatch.setattr(C, "load_recipe", lambda m, s: {})
    cfg = C.resolve("teacher", {})
    assert cfg["method"] == {"name": "dense"}
    assert cfg["training"]["lr"] == C.DEFAULTS["teacher"]["training"]["lr"]
    assert cfg["training"]["batch_size"] == C.DEFAULTS["training"]["batch_size"]
    assert C.resolve("upstream", {})["training"]["lr"] == C.DEFAULTS["upstream"]["training"]["lr"]


def test_recipe_over_defaults_and_cli_over_recipe(recipe):
    cfg = C.resolve("downstream", {"method": {"name": "prune-ofa"}})
    assert cfg["method"] == {"name": "prune-ofa", "final_sparsity": 0.85, "rewind": True}
    assert cfg["training"]["lr"] == 2e-5 and cfg["training"]["epochs"] == 4.0
    user = overrides(["downstream", "--method", "prune-ofa", "--set", "training.lr=3e-5", "method.final_sparsity=0.9",
                      "--downstream.training.epochs", "2", "--batch-size", "8", "--training.seed=7"])
    cfg = C.resolve("downstream", user)
    assert cfg["training"]["lr"] == 3e-5 and cfg["training"]["epochs"] == 2 and cfg["training"]["batch_size"] == 8
    assert cfg["training"]["seed"] == 7
    assert cfg["method"]["final_sparsity"] == 0.9 and cfg["method"]["rewind"] is True
    # the teacher stage is dense whatever the method, and its recipe-free defaults stay
    teacher = C.resolve("teacher", user)
    assert teacher["method"] == {"name": "dense"} and teacher["training"]["lr"] == 3e-5


def test_value_parsing_and_shortcuts():
    assert C.parse_value("3e-5") == 3e-5 and C.parse_value("true") is True and C.parse_value("null") is None
    assert C.parse_value("[sst2, rte]") == ["sst2", "rte"] and C.parse_value("abc") == "abc"
    user = overrides(["pipeline", "--tasks", "sst2,rte", "--corpus", "a.txt", "b.txt", "--data-dir", "d"])
    assert user["data"] == {"tasks": ["sst2", "rte"], "corpus": ["a.txt", "b.txt"], "data_dir": "d"}


@pytest.mark.parametrize("key", ["", "training.", ".lr", "method..sparsity", "method. .x"])
def test_set_refuses_empty_key_parts(key):
    tree = {}
    with pytest.raises(C.ConfigError, match="every part of a dotted key must be a name"):
        C.set_path(tree, key, 1)
    assert tree == {}
    with pytest.raises(C.ConfigError):
        overrides(["downstream", "--set", f"{key}=1"])


def test_pipeline_resolves_each_stage(recipe):
    cfg = pipeline.resolve_pipeline(overrides(["pipeline", "--method", "prune-ofa", "--tasks", "sst2,rte",
                                          "--corpus", "pydoc"]))
    assert list(cfg["stages"]) == ["teacher-sst2", "teacher-rte", "upstream", "downstream-sst2", "downstream-rte"]
    assert cfg["stages"]["downstream-rte"]["method"]["final_sparsity"] == 0.85
    assert cfg["stages"]["teacher-rte"]["data"]["task"] == "rte"
    assert cfg["stages"]["upstream"]["training"]["lr"] == C.DEFAULTS["upstream"]["training"]["lr"]


def test_config_hash_ignores_device_only(monkeypatch):
    monkeypatch.setattr(C, "load_recipe", lambda m, s: {})
    a = C.resolve("teacher", {})
    b = C.resolve("teacher", {"run": {"device": "cuda"}})
    c = C.resolve("teacher", {"training": {"lr": 1.0}})
    assert C.config_hash(a) == C.config_hash(b) != C.config_hash(c)
    assert C.differences(C.comparable(a), C.comparable(c)) == ["training.lr: 5e-05 vs 1.0"]


def test_bad_values():
    with pytest.raises(C.ConfigError, match="unknown config key 'data.tsk'"):
        C.resolve("teacher", {"data": {"tsk": "rte"}})
    with pytest.raises(C.ConfigError, match="training.batch_size must be a positive integer"):
        C.resolve("teacher", {"training": {"batch_size": 0}})
    with pytest.raises(C.ConfigError, match=r"method.sparsities\[1\]|method.sparsities must be a sparsity"):
        C.resolve("downstream", {"method": {"name": "x", "sparsities": [0.5, 1.5]}})
    C.resolve("downstream", {"method": {"name": "x", "final_sparsity": 0.0}})


def test_named_recipe(recipe):
    cfg = C.resolve("downstream", overrides(["downstream", "--method", "prune-ofa", "--recipe", "downstream-qat"]))
    assert cfg["method"] == {"name": "prune-ofa", "quantize": True}
    with pytest.raises(C.ConfigError, match="no recipe recipes/prune-ofa/nope.yaml"):
        C.resolve("downstream", {"method": {"name": "prune-ofa"}, "run": {"recipe": "nope"}})


def test_transformers_argument_names_are_aliases():
    user = overrides(["teacher", "--model_name_or_path", "m", "--learning_rate", "3e-5", "--num_train_epochs", "2",
                      "--per_device_train_batch_size", "8", "--output_dir", "out", "--seed", "3", "--max_steps", "7",
                      "--max_seq_length", "64"])
    assert user == {"model": {"name": "m"}, "training": {"lr": 3e-5, "epochs": 2.0, "batch_size": 8, "seed": 3,
                                                         "max_steps": 7},
                    "run": {"dir": "out"}, "data": {"max_len": 64}}
