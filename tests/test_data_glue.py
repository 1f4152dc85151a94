"""GLUE TSV loading: every task's layout, label mapping, MNLI's two dev sets, test formats, errors."""
import pytest

from _train_fixtures import write_glue
from sparsebert.data import glue
from sparsebert.data.text import pydoc_topic_examples

PAIR_TASKS = ["mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"), n_train=10, n_dev=6)


@pytest.mark.parametrize("name", list(glue.TASKS))
def test_every_task_loads(glue_dir, name):
    task = glue.get_task(name)
    train = glue.load_split(task, glue_dir, "train")
    assert len(train) == (10 if not task.builtin else len(train)) and len(train) > 0
    for split in task.dev_splits:
        dev = glue.load_split(task, glue_dir, split)
        assert dev and all(e["label"] is not None for e in dev)
    for e in train:
        assert e["text_a"].strip()
        assert (e["text_b"] is not None) == (name in PAIR_TASKS)
        if task.labels is None:
            assert isinstance(e["label"], float) and 0 <= e["label"] <= 5
        else:
            assert e["label"] in range(task.num_labels)


def test_label_strings_and_columns(glue_dir):
    rows = (glue_dir / "RTE" / "train.tsv").read_text().splitlines()[1:]
    first = rows[0].split("\t")
    ex = glue.load_split(glue.get_task("rte"), glue_dir, "train")[0]
    assert ex["text_a"] == first[1] and ex["text_b"] == first[2]
    assert ex["label"] == ["entailment", "not_entailment"].index(first[3])
    cola = (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")  # no header row
    ex = glue.load_split(glue.get_task("cola"), glue_dir, "train")[0]
    assert ex["text_a"] == cola[3] and ex["label"] == int(cola[1])
    mnli = (glue_dir / "MNLI" / "dev_mismatched.tsv").read_text().splitlines()[1].split("\t")
    ex = glue.load_split(glue.get_task("mnli"), glue_dir, "dev_mismatched")[0]
    assert ex["label"] == ["entailment", "neutral", "contradiction"].index(mnli[-1])
    assert glue.get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")


def test_test_split_formats(glue_dir):
    for name in ("sst2", "cola"):
        test = glue.load_split(glue.get_task(name), glue_dir, "test")
        assert len(test) == 4 and all(e["label"] is None and e["text_a"] for e in test)


def test_task_dir_can_be_the_task_folder(glue_dir):
    ex = glue.load_split(glue.get_task("SST-2"), glue_dir / "SST-2", "dev")
    assert len(ex) == 6


def test_errors(glue_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        glue.get_task("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        glue.check_data(glue.get_task("rte"), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no GLUE files for task rte"):
        glue.check_data(glue.get_task("rte"), tmp_path)
    bad = tmp_path / "RTE"
    bad.mkdir()
    (bad / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        glue.load_split(glue.get_task("rte"), tmp_path, "train")


def test_pydoc_topics_task():
    task = glue.get_task("pydoc-topics")
    train, dev = pydoc_topic_examples("train"), pydoc_topic_examples("dev")
    assert task.num_labels == 5 and len(train) > 500 and len(dev) > 100
    assert not {e["text_a"] for e in train} & {e["text_a"] for e in dev}
    assert {e["label"] for e in train} == set(range(5))
    assert {e["label"] for e in train[:32]} == set(range(5))  # a prefix holds every class
