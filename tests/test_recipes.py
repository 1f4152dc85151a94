"""Recipes ship inside the package: found from any working directory (in CI, from the installed
wheel), a user's own recipe file with --recipe FILE, and a missing recipe is an error."""
import os
import subprocess
import sys

import pytest
import yaml

import sparsebert
from sparsebert.methods.recipes import RecipeNotFound, load_recipe, load_recipe_file, recipe_names
from sparsebert.train import config as C


def cli(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", "sparsebert.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_recipes_are_found_outside_the_checkout(tmp_path):
    out = cli(["downstream", "--method", "cap", "--task", "sst2", "--print-config"], tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["training"]["lr"] == 3e-5 and cfg["roles"] == {"student": "pretrained", "teacher": "finetuned",
                                                              "pretrained": True}
    assert cfg["method"]["criterion"] == "movement"
    where = subprocess.run([sys.executable, "-c", "import sparsebert; print(sparsebert.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True).stdout
    print("sparsebert imported from", where)  # the installed wheel in CI; the editable install in development


def test_every_shipped_method_has_its_stages():
    assert recipe_names("prune-ofa") == ["downstream", "downstream-qat", "upstream"]
    assert recipe_names("dense") == ["downstream", "teacher", "upstream"]
    for method in ("sparsebert-kap", "cap", "oneshot-magnitude", "gradual-magnitude", "small-dense"):
        assert "downstream" in recipe_names(method)


def test_a_recipe_file_of_ones_own(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: {name: sparsebert-kap, sparsity: 0.8}\ntraining: {lr: 1.0e-4, epochs: 5}\n"
                    "models: {student: pretrained, teacher: finetuned}\n")
    cfg = C.resolve("downstream", {"run": {"recipe": str(path)}})
    assert cfg["method"]["name"] == "sparsebert-kap" and cfg["method"]["sparsity"] == 0.8
    assert cfg["training"]["lr"] == 1e-4 and cfg["training"]["epochs"] == 5 and cfg["roles"]["teacher"] == "finetuned"
    assert load_recipe_file(path)["method"]["name"] == "sparsebert-kap"
    with pytest.raises(C.ConfigError, match="--method cap but recipe .* is for method 'sparsebert-kap'"):
        C.resolve("downstream", {"method": {"name": "cap"}, "run": {"recipe": str(path)}})


@pytest.mark.parametrize("text,message", [
    ("method: {sparsity: 0.8}\n", "needs method.name"),
    ("method: {name: cap, sparsty: 0.8}\n", "unknown options"),
    ("method: {name: cap}\nmodel: {}\n", "unknown sections"),
    ("method: {name: cap}\ntraining: {lrr: 1}\n", "recipe training.lrr is not a trainer setting"),
    ("method: [cap\n", "not valid YAML"),
])
def test_a_bad_recipe_file_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError, match=message):
        C.resolve("downstream", {"run": {"recipe": str(path)}})


def test_missing_recipes_are_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="no recipe recipes/sparsebert-kap/upstream.yaml; sparsebert-kap has downstream"):
        C.resolve("upstream", {"method": {"name": "sparsebert-kap"}})
    with pytest.raises(C.ConfigError, match="recipe file .*nope.yaml does not exist"):
        C.resolve("downstream", {"run": {"recipe": str(tmp_path / "nope.yaml")}})
    with pytest.raises(RecipeNotFound):
        load_recipe("cap", "upstream")
    out = cli(["upstream", "--method", "cap", "--corpus", "pydoc", "--print-config"], tmp_path)
    assert out.returncode == 2 and "error: no recipe recipes/cap/upstream.yaml" in out.stderr


def test_the_package_dir_holds_the_recipes():
    assert (sparsebert.methods.recipes.recipes_dir() / "cap" / "downstream.yaml").is_file()
