"""Every default of `python -m sparsebert.train`, in one place, and how a run's config is resolved.

Layers, each overriding the one before:
  1. DEFAULTS below (`training` shared by all stages, then the stage's own `<stage>.training`);
  2. the method's recipe `sparsebert/recipes/<method>/<stage>.yaml`, or --recipe FILE (its `method:`,
     `training:` and `models:` sections);
  3. the command line (`--set a.b=value`, dotted flags, and the shortcut flags).
The resolved config of a stage is flat: {stage, model, data, training, method, run}.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import yaml

from ..methods import NotRegistered, RecipeNotFound
from ..methods import load_recipe as library_recipe
from ..methods.recipes import load_recipe_file, recipe_names
from .errors import ConfigError

STAGES = ("teacher", "upstream", "downstream", "evaluate", "pipeline")

DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "minilm",          # a transformers checkpoint name or local dir; "minilm" = the bundled MiniLM
        "teacher": None,           # downstream: fine-tuned dense teacher dir (pipeline: the teacher stage's output)
        "pretrained": None,        # downstream: frozen pre-trained encoder for methods that use one (CAP)
    },
    "data": {
        "task": "sst2",            # a GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli) or pydoc-topics
        "tasks": None,             # pipeline: several downstream tasks, e.g. [sst2, rte]; None = [task]
        "data_dir": None,          # dir with GLUE TSV files (<dir>/<TASK>/train.tsv or <dir>/train.tsv); None = `datasets`
        "corpus": None,            # upstream: list of text files, "pydoc" (bundled), or a `datasets` name "path[:config]"
        "eval_corpus": None,       # upstream: held-out text files; None = the last eval_fraction of the corpus
        "eval_fraction": 0.05,
        "max_len": 128,            # tokens per example / per upstream text block
        "max_train_examples": None,  # at most this many training examples (quick runs, small-task studies)
        "subset_seed": None,       # with max_train_examples: a random subset fixed by this seed; None = the first ones
        "max_eval_examples": None,
        "mlm_probability": 0.15,
        "augment": 0,              # variants of every training example (TinyBERT-style word replacement); 0 = off
        "objective": "auto",       # upstream: auto = mlm if the model has an MLM head, else representation
        "cache_dir": "~/.cache/sparsebert",  # tokenization cache
    },
    "training": {
        "seed": 42,
        "epochs": 3.0,             # passes over the training set (before augmentation), when max_steps is None
        "max_steps": None,
        "min_steps": None,         # at least this many steps: small tasks get more epochs (the papers' 12-30)
        "batch_size": 32,
        "group_by_length": True,   # batch examples of similar length (SST-2: 2.9x fewer padded tokens)
        "eval_batch_size": 128,
        "lr": 5e-5,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "log_every": 10,           # steps between train-loss lines in metrics.jsonl
        "eval_every": None,        # steps between evaluations; None = once per epoch, at most 10 times (and at the end)
        "checkpoint_every": 200,   # steps between checkpoints (and one at the end)
        "keep_checkpoints": 1,     # checkpoints kept once the stage is done (0: none; 1 is kept while it runs)
    },
    "teacher": {"training": {"lr": 5e-5, "epochs": 3.0}},
    "upstream": {"training": {"lr": 1e-4, "epochs": 1.0}},
    "downstream": {"training": {"lr": 5e-5, "epochs": 3.0}},
    "evaluate": {"training": {}},
    "method": {"name": "prune-ofa"},  # teacher stage: always "dense"
    # which models a method uses (None = as its recipe's `models:` section says, else the stage's usual):
    "roles": {
        "student": None,           # downstream: upstream (pipeline: the upstream output) | pretrained
        "teacher": None,           # downstream: finetuned | none | pretrained
        "pretrained": None,        # downstream: true = pass the frozen pre-trained encoder (CAP's PrC)
    },
    "run": {
        "out_dir": "runs",         # a new run dir is made under it, unless run.dir is given
        "dir": None,
        "device": "auto",          # auto | cpu | cuda | cuda:N
        "precision": "fp32",       # fp32 | bf16 | fp16 (fp16 needs cuda)
        "threads": None,           # torch CPU threads; None = torch's default
        "time_limit": None,        # seconds of training per stage and invocation; a stage cut short says so
        "distributed": "auto",     # under torchrun: auto (= ddp) | ddp | fsdp (FSDP2 per encoder layer); none alone
        "dist_backend": "auto",    # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl
        "smoke": False,            # reduced steps and data, same code path (tests)
        "recipe": None,            # upstream/downstream: a recipe name of the method (downstream-qat, structured;
                                   # None = the stage's name) or a recipe file of your own (its method.name)
    },
}

STAGE_SECTIONS = ("teacher", "upstream", "downstream", "evaluate")
# keys of `run` that may differ between an interrupted run and its --resume
RESUME_FREE = ("run.device", "run.threads", "run.out_dir", "run.dir", "run.time_limit", "run.distributed",
               "run.dist_backend")


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars and lists (`3e-5`, `true`, `null`, `[sst2, rte]`)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML reads 3e-5 as a string; numbers win
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"cannot set {dotted!r}: every part of a dotted key must be a name")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def get_path(tree: dict, dotted: str, default: Any = None) -> Any:
    node = tree
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def check_known_keys(user: dict) -> None:
    """Refuse misspelt keys: every override outside `method` must name a default."""
    def walk(node: dict, ref: dict, prefix: str):
        for k, v in node.items():
            path = f"{prefix}{k}"
            if prefix == "" and k == "method":
                continue
            if k not in ref:
                close = ", ".join(sorted(ref))
                raise ConfigError(f"unknown config key {path!r}; known keys here: {close}")
            if isinstance(v, dict) and isinstance(ref[k], dict):
                walk(v, ref[k], path + ".")
    walk(user, {**DEFAULTS, "training": DEFAULTS["training"],
                **{s: {"training": DEFAULTS["training"]} for s in STAGE_SECTIONS}}, "")


# recipe `training:` keys that configure another section here, and keys the trainer derives itself
RECIPE_TRAINING_MAP = {"max_seq_len": "data.max_len", "augment": "data.augment"}
RECIPE_TRAINING_DERIVED = ("objective",)  # from the task (downstream) or the model's head (upstream)


def load_recipe(method: str, stage: str) -> dict:
    """The library's recipe for (method, stage). A method that ships no recipe at all (a user's own)
    runs on the defaults, and an unknown one is refused by the stage's preflight with the known ones:
    both give {}. A shipped method without a recipe for the stage is an error."""
    try:
        return library_recipe(method, stage)
    except NotRegistered:
        return {}
    except RecipeNotFound as e:
        if recipe_names(method):
            raise ConfigError(str(e)) from None
        return {}
    except ValueError as e:  # a recipe that names unknown options
        raise ConfigError(f"recipe {method}/{stage}: {e}") from None


def is_recipe_file(recipe: str) -> bool:
    """--recipe takes a recipe name of the method (downstream-qat) or the path of a user's own file."""
    return recipe.endswith((".yaml", ".yml")) or "/" in recipe or os.sep in recipe


def _recipe(stage: str, user: dict) -> tuple[str, dict]:
    """(method name, recipe) of a stage: the teacher is dense; --recipe FILE names its own method."""
    if stage == "teacher":
        return "dense", load_recipe("dense", "teacher")
    given = get_path(user, "method.name")
    chosen = get_path(user, "run.recipe") if stage in ("upstream", "downstream") else None
    if chosen and is_recipe_file(str(chosen)):
        try:
            recipe = load_recipe_file(chosen)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        except RecipeNotFound as e:
            raise ConfigError(str(e)) from None
        if given and given != recipe["method"]["name"]:
            raise ConfigError(f"--method {given} but recipe {chosen} is for method {recipe['method']['name']!r}")
        return recipe["method"]["name"], recipe
    method = given or DEFAULTS["method"]["name"]
    if stage == "evaluate":
        return method, {}
    recipe = load_recipe(method, chosen or stage)
    if chosen and not recipe:
        raise ConfigError(f"no recipe recipes/{method}/{chosen}.yaml")
    return method, recipe


def split_recipe_training(training: dict) -> tuple[dict, dict]:
    """A recipe's `training:` section -> (training fields, other dotted fields such as data.max_len)."""
    own, other = {}, {}
    for k, v in (training or {}).items():
        if k in RECIPE_TRAINING_MAP:
            other[RECIPE_TRAINING_MAP[k]] = v
        elif k in RECIPE_TRAINING_DERIVED:
            continue
        elif k in DEFAULTS["training"]:
            own[k] = v
        else:
            raise ConfigError(f"recipe training.{k} is not a trainer setting; known: "
                              f"{', '.join(sorted([*DEFAULTS['training'], *RECIPE_TRAINING_MAP, *RECIPE_TRAINING_DERIVED]))}")
    return own, other


def resolve(stage: str, user: dict) -> dict:
    """The flat config of one stage run: defaults < stage defaults < recipe < user."""
    check_known_keys(user)
    method_name, recipe = _recipe(stage, user)
    training = merge(DEFAULTS["training"], DEFAULTS[stage]["training"] if stage in STAGE_SECTIONS else {})
    recipe_training, recipe_other = split_recipe_training(recipe.get("training"))
    recipe_layer: dict = {}
    for dotted, value in recipe_other.items():
        set_path(recipe_layer, dotted, value)
    training = merge(training, recipe_training)
    training = merge(training, user.get("training", {}))
    training = merge(training, get_path(user, f"{stage}.training", {}) or {})
    method = {"name": method_name}
    method = merge(method, {k: v for k, v in (recipe.get("method", {}) or {}).items() if k != "name"})
    if stage != "teacher":
        method = merge(method, user.get("method", {}))
    cfg = {
        "stage": stage,
        "model": merge(DEFAULTS["model"], user.get("model", {})),
        "data": merge(merge(DEFAULTS["data"], recipe_layer.get("data", {})), user.get("data", {})),
        "training": training,
        "method": method,
        "roles": merge(merge(DEFAULTS["roles"], {k: v for k, v in (recipe.get("models") or {}).items()
                                                  if k in DEFAULTS["roles"]}), user.get("roles", {})),
        "run": merge(DEFAULTS["run"], user.get("run", {})),
    }
    if cfg["run"]["smoke"]:
        apply_smoke(cfg)
    validate_values(cfg)
    return cfg


def apply_smoke(cfg: dict) -> None:
    """Smoke mode: the same code path on a sliver of data and a few steps."""
    t, d = cfg["training"], cfg["data"]
    t["max_steps"] = min(t["max_steps"] or 3, 3)
    t["batch_size"] = min(t["batch_size"], 4)
    t["eval_every"] = None
    d["max_len"] = min(d["max_len"], 32)
    d["max_train_examples"] = min(d["max_train_examples"] or 32, 32)
    d["max_eval_examples"] = min(d["max_eval_examples"] or 16, 16)


def validate_values(cfg: dict) -> None:
    t = cfg["training"]
    for key in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every"):
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] <= 0:
            raise ConfigError(f"training.{key} must be a positive integer, got {t[key]!r}")
    if isinstance(t["keep_checkpoints"], bool) or not isinstance(t["keep_checkpoints"], int) or t["keep_checkpoints"] < 0:
        raise ConfigError(f"training.keep_checkpoints must be a non-negative integer, got {t['keep_checkpoints']!r}")
    for key in ("max_steps", "min_steps"):
        if t[key] is not None and (isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] <= 0):
            raise ConfigError(f"training.{key} must be a positive integer or null, got {t[key]!r}")
    augment = cfg["data"]["augment"]
    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise ConfigError(f"data.augment (--augment) must be a non-negative integer, got {augment!r}")
    if t["max_steps"] is None and not (isinstance(t["epochs"], (int, float)) and t["epochs"] > 0):
        raise ConfigError(f"training.epochs must be positive, got {t['epochs']!r}")
    for key in ("lr", "weight_decay"):
        if not isinstance(t[key], (int, float)) or t[key] < 0:
            raise ConfigError(f"training.{key} must be a non-negative number, got {t[key]!r}")
    r = cfg["run"]
    if r["threads"] is not None and (isinstance(r["threads"], bool) or not isinstance(r["threads"], int) or r["threads"] <= 0):
        raise ConfigError(f"run.threads (--threads) must be a positive integer, got {r['threads']!r}")
    if r["time_limit"] is not None and (isinstance(r["time_limit"], bool) or not isinstance(r["time_limit"], (int, float))
                                        or r["time_limit"] <= 0):
        raise ConfigError(f"run.time_limit (--time-limit) must be a positive number of seconds, got {r['time_limit']!r}")
    if cfg["run"]["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"run.precision must be fp32, bf16 or fp16, got {cfg['run']['precision']!r}")
    if not 0.0 < float(cfg["data"]["mlm_probability"]) < 1.0:
        raise ConfigError(f"data.mlm_probability must be in (0, 1), got {cfg['data']['mlm_probability']!r}")
    if cfg["data"]["objective"] not in ("auto", "mlm", "representation"):
        raise ConfigError(f"data.objective must be auto, mlm or representation, got {cfg['data']['objective']!r}")
    check_sparsities(cfg["method"])


def check_sparsities(node: Any, path: str = "method") -> None:
    """Every numeric method field named *sparsity* / *sparsities* must be a fraction in [0, 1)."""
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        if isinstance(v, dict):
            check_sparsities(v, f"{path}.{k}")
        elif "sparsit" in str(k).lower() and v is not None:
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, str):  # e.g. sparsity_pattern: "4:8" is the method's to judge
                    continue
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x < 1.0:
                    raise ConfigError(f"{path}.{k} must be a sparsity in [0, 1), got {v!r}")


def comparable(cfg: dict) -> dict:
    """The config without what may differ between a run and its resume (RESUME_FREE), in a pipeline's
    stages and user overrides too."""
    out = copy.deepcopy(cfg)
    if isinstance(out.get("stages"), dict):
        out["stages"] = {k: comparable(v) for k, v in out["stages"].items()}
    if isinstance(out.get("user"), dict):
        out["user"] = comparable(out["user"])
    for dotted in RESUME_FREE:
        keys = dotted.split(".")
        node = out
        for k in keys[:-1]:
            node = node.get(k, {})
        node.pop(keys[-1], None)
    return out


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(comparable(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
