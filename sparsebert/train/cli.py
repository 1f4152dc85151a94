"""Command line of `python -m sparsebert.train`."""
from __future__ import annotations

import argparse
import sys

from . import config as C
from . import default, logs
from .errors import ConfigError, TrainError
from .distributed import error_prefix, launched_world
from .pipeline import run_command
from .runs import Run

DESCRIPTION = """\
sparsebert trainer: pruning during pre-training (upstream) and fine-tuning (downstream) of
BERT-family transformers models.

With no arguments it runs the embedded default (no network, no files needed): the bundled
MiniLM, pruned upstream on the Python documentation text, then fine-tuned on a task built from
that text; dense vs sparse results in runs/<time>-pipeline/report.md. `--smoke` runs it reduced.

Stages (subcommands):
  teacher     fine-tune the dense teacher on a task (method: dense)
  upstream    prune during pre-training on raw text (objective mlm if the model has an MLM head,
              else representation distillation from the dense model)
  downstream  fine-tune / prune on a task with a method (student: --model, teacher: --teacher)
  evaluate    evaluate a model dir on a task's dev split(s)
  pipeline    teacher (per task) + upstream + downstream (per task), each reusing the previous output

The transformers names of the common flags work too (--model_name_or_path, --learning_rate,
--num_train_epochs, --per_device_train_batch_size, --max_steps, --max_seq_length, --output_dir).

Examples:
  python -m sparsebert.train teacher --model minilm --task rte --data-dir ../shared/data/glue
  python -m sparsebert.train pipeline --method prune-ofa --corpus ../shared/data/wikitext-2/valid.txt \\
      --tasks sst2,rte --data-dir ../shared/data/glue --set method.sparsity=0.9
  python -m sparsebert.train --resume runs/20260101-120000-pipeline
  torchrun --nproc_per_node=2 -m sparsebert.train downstream --method sparsebert-kap --task sst2 ...
      (one job over 2 processes: --batch-size is the global batch; see docs/DISTRIBUTED.md)
"""

OVERRIDES = """\
Config: every field (see sparsebert/train/config.py) is overridable, last wins:
  --set training.lr=3e-5 method.sparsity=0.9           (values are YAML: 3e-5, true, null, [sst2, rte])
  --training.lr 3e-5  or  --training.lr=3e-5            (dotted flags)
  --upstream.training.epochs 2                          (stage-specific training settings)
Precedence: defaults < stage defaults < the method's recipe (sparsebert/recipes/<method>/<stage>.yaml, or --recipe FILE) < command line.
The resolved config is saved as <run>/config.yaml; --print-config shows it without running.
"""

# shortcut flag -> dotted config key
SHORTCUTS = {
    "model": "model.name", "teacher": "model.teacher", "pretrained": "model.pretrained",
    "task": "data.task", "tasks": "data.tasks", "data_dir": "data.data_dir", "corpus": "data.corpus",
    "eval_corpus": "data.eval_corpus", "max_len": "data.max_len", "cache_dir": "data.cache_dir", "augment": "data.augment",
    "method": "method.name", "epochs": "training.epochs", "max_steps": "training.max_steps",
    "batch_size": "training.batch_size", "lr": "training.lr", "seed": "training.seed",
    "out": "run.out_dir", "run_dir": "run.dir", "device": "run.device", "precision": "run.precision",
    "threads": "run.threads", "recipe": "run.recipe", "time_limit": "run.time_limit",
    "keep_checkpoints": "training.keep_checkpoints", "distributed": "run.distributed", "dist_backend": "run.dist_backend",
}


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", "--model_name_or_path", help="checkpoint name or dir; 'minilm' = the bundled all-MiniLM-L6-v2 (default)")
    g.add_argument("--teacher", help="downstream: fine-tuned dense teacher dir")
    g.add_argument("--pretrained", help="downstream: frozen pre-trained encoder for methods that use one (cap)")
    g.add_argument("--task", help="GLUE task: cola sst2 mrpc stsb qqp mnli qnli rte wnli, or pydoc-topics")
    g.add_argument("--tasks", help="pipeline: comma-separated downstream tasks, e.g. sst2,rte")
    g.add_argument("--data-dir", help="dir of GLUE TSV files (<dir>/<TASK>/train.tsv); default: `datasets` by name")
    g.add_argument("--corpus", nargs="+", help="upstream text: .txt files/dirs, 'pydoc', or a datasets name path:config")
    g.add_argument("--eval-corpus", nargs="+", help="upstream held-out text (default: tail of --corpus)")
    g.add_argument("--max-len", "--max_seq_length", type=int, help="max tokens per example")
    g.add_argument("--cache-dir", help="tokenization cache dir")
    g.add_argument("--augment", type=int, metavar="N",
                   help="N TinyBERT-style variants of every training example (word replacement; 0 = off)")
    g = p.add_argument_group("method and training")
    g.add_argument("--method", help="prune-ofa | sparsebert-kap | cap | <baselines> | dense")
    g.add_argument("--recipe", help="recipe file of the method other than the stage's, e.g. downstream-qat")
    g.add_argument("--epochs", "--num_train_epochs", type=float)
    g.add_argument("--max-steps", "--max_steps", type=int)
    g.add_argument("--batch-size", "--per_device_train_batch_size", type=int)
    g.add_argument("--lr", "--learning_rate", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. training.lr=3e-5 method.sparsity=0.9")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="parent dir of new run dirs (default runs/)")
    g.add_argument("--run-dir", "--output_dir", help="exact dir of this run")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run (killed or not) from its last checkpoint")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--keep-checkpoints", type=int, metavar="N",
                   help="checkpoints kept once a stage is done (default 1; 0: none, the exported model stays)")
    g.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="end each stage's training after this many seconds; its results and report say so")
    g.add_argument("--distributed", choices=["auto", "ddp", "fsdp", "none"],
                   help="under torchrun: ddp (the default) or fsdp (FSDP2, sharded per encoder layer); see docs/DISTRIBUTED.md")
    g.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], help="torch.distributed backend (auto: nccl on CUDA, gloo on CPU)")
    g.add_argument("--smoke", action="store_true", help="reduced steps and data (same code path)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug messages too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparsebert.train", description=DESCRIPTION, epilog=OVERRIDES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    helps = {"teacher": "fine-tune the dense teacher on a task", "upstream": "prune during pre-training on raw text",
             "downstream": "fine-tune/prune on a task with a method", "evaluate": "evaluate a model on a task",
             "pipeline": "teacher + upstream + downstream, chained", "default": "the embedded default pipeline"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=f"{text}.\n\n{OVERRIDES}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common(p)
    return parser


def user_overrides(args: argparse.Namespace, extra: list[str]) -> dict:
    user: dict = {}
    for attr, key in SHORTCUTS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        if attr == "tasks":
            value = [t for t in value.split(",") if t]
        if attr in ("corpus", "eval_corpus") and len(value) == 1:
            value = value[0]
        C.set_path(user, key, value)
    if getattr(args, "smoke", False):
        C.set_path(user, "run.smoke", True)
    for group in args.set:
        for item in group:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            key, value = item.split("=", 1)
            C.set_path(user, key.strip(), C.parse_value(value))
    i = 0
    while i < len(extra):  # dotted flags: --training.lr 3e-5 | --training.lr=3e-5
        item = extra[i]
        if not item.startswith("--") or "." not in item:
            raise ConfigError(f"unrecognized argument {item!r} (see --help)")
        if "=" in item:
            key, value = item[2:].split("=", 1)
        elif i + 1 < len(extra):
            key, value = item[2:], extra[i + 1]
            i += 1
        else:
            raise ConfigError(f"{item} needs a value")
        C.set_path(user, key, C.parse_value(value))
        i += 1
    return user


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        if "--resume" in argv:
            argv = ["resume-any"] + argv
        else:
            argv = ["default"] + argv
    logs.configure(-1 if {"-q", "--quiet"} & set(argv) else 1 if {"-v", "--verbose"} & set(argv) else 0)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume <run dir>", file=sys.stderr)
        return 130
    except TrainError as e:
        print(f"{error_prefix()}error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    if argv[0] == "resume-any":  # --resume DIR without a stage: the stage is in the saved config
        p = argparse.ArgumentParser(prog="python -m sparsebert.train")
        add_common(p)
        args, extra = p.parse_known_args(argv[1:])
        run = Run.open(args.resume)
        argv = [run.saved_config()["stage"]] + argv[1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    user = user_overrides(args, extra)
    if args.stage == "default":
        if launched_world() > 1:
            raise ConfigError("the embedded default run is a single-process demo with a time budget; under torchrun "
                              "run a stage or `pipeline` (see docs/DISTRIBUTED.md)")
        return default.main(user, smoke=args.smoke, print_config=args.print_config, resume=args.resume)
    return run_command(args.stage, user, resume=args.resume, print_config=args.print_config)
