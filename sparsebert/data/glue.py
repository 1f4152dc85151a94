"""GLUE tasks: their TSV layouts, labels and metrics; loading from local files or `datasets`.

An example is a dict {text_a, text_b (or None), label (int class id, float score, or None on test)}.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path

csv.field_size_limit(sys.maxsize)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str                      # canonical lower-case name, e.g. "sst2"
    dir_name: str                  # GLUE folder name, e.g. "SST-2"
    labels: tuple | None           # label strings as in the TSV, in class-id order; None = regression
    metrics: tuple[str, ...]
    text_a: str | int              # TSV column (header name, or index for header-less files)
    text_b: str | int | None
    label: str | int
    header: bool = True            # train/dev files have a header row
    test_text_a: str = "sentence"  # test.tsv always has a header
    test_text_b: str | None = None
    dev_splits: tuple[str, ...] = ("dev",)
    hf_fields: tuple[str, str | None] = ("sentence", None)   # `datasets` glue field names
    builtin: bool = False          # data shipped with the package (no files, no network)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def objective(self) -> str:
        return "regression" if self.labels is None else "classification"


TASKS: dict[str, Task] = {t.name: t for t in [
    # CoLA train/dev: no header; columns: source, label, original label, sentence
    Task("cola", "CoLA", ("0", "1"), ("matthews_corr",), 3, None, 1, header=False),
    Task("sst2", "SST-2", ("0", "1"), ("accuracy",), "sentence", None, "label"),
    Task("mrpc", "MRPC", ("0", "1"), ("accuracy", "f1"), "#1 String", "#2 String", "Quality",
         test_text_a="#1 String", test_text_b="#2 String", hf_fields=("sentence1", "sentence2")),
    Task("stsb", "STS-B", None, ("pearson", "spearman"), "sentence1", "sentence2", "score",
         test_text_a="sentence1", test_text_b="sentence2", hf_fields=("sentence1", "sentence2")),
    Task("qqp", "QQP", ("0", "1"), ("accuracy", "f1"), "question1", "question2", "is_duplicate",
         test_text_a="question1", test_text_b="question2", hf_fields=("question1", "question2")),
    Task("mnli", "MNLI", ("entailment", "neutral", "contradiction"), ("accuracy",), "sentence1", "sentence2",
         "gold_label", test_text_a="sentence1", test_text_b="sentence2",
         dev_splits=("dev_matched", "dev_mismatched"), hf_fields=("premise", "hypothesis")),
    Task("qnli", "QNLI", ("entailment", "not_entailment"), ("accuracy",), "question", "sentence", "label",
         test_text_a="question", test_text_b="sentence", hf_fields=("question", "sentence")),
    Task("rte", "RTE", ("entailment", "not_entailment"), ("accuracy",), "sentence1", "sentence2", "label",
         test_text_a="sentence1", test_text_b="sentence2", hf_fields=("sentence1", "sentence2")),
    Task("wnli", "WNLI", ("0", "1"), ("accuracy",), "sentence1", "sentence2", "label",
         test_text_a="sentence1", test_text_b="sentence2", hf_fields=("sentence1", "sentence2")),
    # Built from the standard library's documentation (see text.py): which topic is a sentence from?
    Task("pydoc-topics", "", None, ("accuracy",), "", None, "", builtin=True),
]}

ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}
HF_GLUE = "nyu-mll/glue"  # the GLUE data set's name on the Hub


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    task = TASKS[key]
    if task.name == "pydoc-topics":
        from .text import PYDOC_TOPIC_LABELS
        task = dataclasses.replace(task, labels=tuple(PYDOC_TOPIC_LABELS))
    return task


def main_score(task: Task, metrics: dict[str, float]) -> float:
    """One number per task, as the GLUE leaderboard: the mean of the task's metrics (first dev split)."""
    split = task.dev_splits[0]
    return sum(metrics[f"{split}/{m}"] for m in task.metrics) / len(task.metrics)


def task_dir(task: Task, data_dir: str | os.PathLike) -> Path:
    """`<data_dir>/<TASK>/` when it exists, else `<data_dir>` itself (a dir holding one task's files)."""
    root = Path(data_dir).expanduser()
    for cand in (root / task.dir_name, root / task.dir_name.lower(), root / task.name, root):
        if (cand / "train.tsv").is_file() or (cand / f"{task.dev_splits[0]}.tsv").is_file():
            return cand
    raise FileNotFoundError(
        f"no GLUE files for task {task.name} under {root} "
        f"(looked for {root / task.dir_name / 'train.tsv'} and {root / 'train.tsv'})")


def split_file(task: Task, data_dir, split: str) -> Path:
    path = task_dir(task, data_dir) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"task {task.name}: missing {path}")
    return path


def read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _column(header: list[str], col: str | int | None, path: Path) -> int | None:
    if col is None or isinstance(col, int):
        return col
    if col in header:
        return header.index(col)
    raise ValueError(f"{path}:1: expected a column {col!r}, the header has {header}")


def parse_label(task: Task, raw: str, where: str):
    raw = raw.strip()
    if task.labels is None:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: score {raw!r} is not a number") from None
    if raw not in task.labels:
        raise ValueError(f"{where}: label {raw!r} is not one of {task.labels}")
    return task.labels.index(raw)


def load_tsv(task: Task, data_dir, split: str) -> list[dict]:
    """One split from the standard GLUE TSV layout; `test` splits have no labels."""
    path = split_file(task, data_dir, split)
    rows = read_tsv(path)
    if not rows:
        raise ValueError(f"{path}: empty file, no header and no examples")
    test = split.startswith("test")
    if test or task.header:
        header, rows = rows[0], rows[1:]
    else:
        header = []
    if test:
        ia, ib, il = _column(header, task.test_text_a, path), _column(header, task.test_text_b, path), None
    else:
        ia, ib = _column(header, task.text_a, path), _column(header, task.text_b, path)
        il = len(header) - 1 if task.name == "mnli" else _column(header, task.label, path)
    need = max(i for i in (ia, ib, il) if i is not None)
    examples = []
    for n, row in enumerate(rows):
        if len(row) <= need:  # QQP train has a few broken rows; GLUE's own loader skips them too
            continue
        label = None if il is None else parse_label(task, row[il], f"{path}:{n + 1 + bool(header)}")
        examples.append({"text_a": row[ia], "text_b": row[ib] if ib is not None else None, "label": label})
    if not examples:
        raise ValueError(f"{path}: no examples (only a header, or every row short of column {need + 1})")
    return examples


def load_hf(task: Task, split: str) -> list[dict]:
    """One split through `datasets` (needs the package and a network or a filled HF cache)."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"task {task.name}: no --data-dir given and the `datasets` package is not installed; "
            "pass --data-dir <dir with GLUE TSV files> or `pip install datasets`") from None
    hf_split = {"dev": "validation", "dev_matched": "validation_matched",
                "dev_mismatched": "validation_mismatched"}.get(split, split)
    ds = datasets.load_dataset(HF_GLUE, task.name, split=hf_split)
    fa, fb = task.hf_fields
    return [{"text_a": r[fa], "text_b": r[fb] if fb else None,
             "label": None if r["label"] == -1 else (float(r["label"]) if task.labels is None else int(r["label"]))}
            for r in ds]


def load_split(task: Task, data_dir, split: str) -> list[dict]:
    if task.builtin:
        from .text import pydoc_topic_examples
        return pydoc_topic_examples(split)
    if data_dir is not None:
        return load_tsv(task, data_dir, split)
    return load_hf(task, split)


def check_data(task: Task, data_dir) -> None:
    """Fail early, naming file and line: the splits a run reads exist, parse, and train has labels.
    Without --data-dir the splits come from `datasets`, which must load them now (from its cache when
    the Hub cannot be reached), not after a run dir exists."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data dir {data_dir} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"data dir {data_dir} is a file; --data-dir takes the dir holding <TASK>/train.tsv")
    elif not task.builtin:
        _check_hub_reachable(task)
    for split in ("train", *task.dev_splits):
        examples = load_split(task, data_dir, split)
        if split == "train" and any(e["label"] is None for e in examples):
            raise ValueError(f"task {task.name}: the training split has examples without labels")


def _check_hub_reachable(task: Task) -> None:
    """`datasets` retries a missing network for a long while; decide now, in a few seconds."""
    import importlib.util
    import os
    import socket
    if importlib.util.find_spec("datasets") is None:
        raise RuntimeError(f"task {task.name}: no --data-dir given and the `datasets` package is not installed; "
                           "pass --data-dir <dir with GLUE TSV files> or `pip install datasets`")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            return
        except OSError:
            os.environ["HF_DATASETS_OFFLINE"] = "1"  # then `datasets` answers from its cache at once
    try:
        load_hf(task, "train")
    except Exception as e:
        raise RuntimeError(f"task {task.name}: no --data-dir given, the Hub cannot be reached and `datasets` has no "
                           f"cached copy of {HF_GLUE} ({type(e).__name__}); pass --data-dir <dir with GLUE TSV "
                           f"files, <dir>/{task.dir_name}/train.tsv>") from None
