"""Raw-text corpora for upstream pruning, and the built-in corpus and task from Python's own docs.

A corpus is a list of documents (strings). Sources: local text files, "pydoc" (the standard
library's documentation topics, `pydoc_data.topics`, present in every Python installation), or a
`datasets` name "path[:config]" (lazy import, needs the package).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Documentation topics grouped into the classes of the built-in `pydoc-topics` task.
PYDOC_TOPIC_GROUPS = {
    "statements": ["assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del",
                   "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise", "return",
                   "try", "while", "with", "yield"],
    "expressions": ["atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
                    "booleans", "calls", "comparisons", "conversions", "exprlists", "floating", "identifiers",
                    "imaginary", "in", "integers", "lambda", "numbers", "operator-summary", "power", "shifting",
                    "slicings", "strings", "subscriptions", "unary"],
    "data model": ["attribute-access", "callable-types", "context-managers", "customization", "id-classes",
                   "numeric-types", "objects", "sequence-types", "specialattrs", "specialnames", "types"],
    "built-in types": ["bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
                       "dict", "formatstrings", "lists", "string-methods", "truth", "typesfunctions",
                       "typesmapping", "typesmethods", "typesmodules", "typesseq", "typesseq-mutable"],
    "execution": ["debugger", "dynamic-features", "exceptions", "execmodel", "naming"],
}
PYDOC_TOPIC_LABELS = list(PYDOC_TOPIC_GROUPS)


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return topics


def pydoc_corpus() -> list[str]:
    """Every documentation topic as one document, in a fixed order."""
    topics = _pydoc_topics()
    return [topics[k] for k in sorted(topics)]


def _sentences(text: str) -> list[str]:
    """Prose sentences of a topic: skip indented code/grammar blocks and headings."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("   ") or set(para.strip()) <= set("*=-~^"):
            continue
        para = " ".join(para.split())
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z\"*])", para):
            if len(sent.split()) >= 6:
                out.append(" ".join(sent.split()[:48]))
    return out


def pydoc_topic_examples(split: str) -> list[dict]:
    """The `pydoc-topics` task: which group of documentation topics does a sentence come from?

    Sentences found in topics of two groups are dropped; a fifth of them (by a hash) form `dev`.
    """
    if split not in ("train", "dev"):
        raise ValueError(f"task pydoc-topics has splits train and dev, not {split!r}")
    topics = _pydoc_topics()
    owner: dict[str, int] = {}
    for label, names in enumerate(PYDOC_TOPIC_GROUPS.values()):
        for name in names:
            for sent in _sentences(topics.get(name, "")):
                if owner.get(sent, label) != label:
                    owner[sent] = -1
                else:
                    owner[sent] = label
    examples = []
    # in hash order, not topic order: any prefix (max_train_examples, --smoke) holds every class
    for sent, label in sorted(owner.items(), key=lambda kv: hashlib.md5(kv[0].encode()).hexdigest()):
        if label < 0:
            continue
        is_dev = int(hashlib.md5(sent.encode()).hexdigest(), 16) % 5 == 0
        if is_dev == (split == "dev"):
            examples.append({"text_a": sent, "text_b": None, "label": label})
    return examples


def load_corpus(source, split: str = "train") -> tuple[list[str], str]:
    """Documents from a source, and a fingerprint of their content (for the tokenization cache)."""
    if source is None:
        raise ValueError("upstream needs a corpus: --corpus <text files> | pydoc | <datasets name>")
    sources = source if isinstance(source, list) else [source]
    docs: list[str] = []
    for src in sources:
        src = str(src)
        path = Path(src).expanduser()
        if src == "pydoc":
            docs += pydoc_corpus()
        elif path.is_file():
            docs += _split_docs(path.read_text(encoding="utf-8", errors="replace"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*.txt"))
            if not files:
                raise FileNotFoundError(f"corpus dir {path} holds no .txt files")
            for p in files:
                docs += _split_docs(p.read_text(encoding="utf-8", errors="replace"))
        elif "/" in src and not src.startswith((".", "/", "~")) or ":" in src:
            docs += _load_hf_corpus(src, split)
        else:
            raise FileNotFoundError(f"corpus {src!r}: no such file or dir (and not 'pydoc' or a datasets name)")
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    return docs, digest


def _split_docs(text: str) -> list[str]:
    """Paragraphs (blank-line separated) as documents; keeps memory per tokenizer call small."""
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _load_hf_corpus(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"corpus {name!r} needs the `datasets` package (or pass local text files)") from None
    path, _, config = name.partition(":")
    ds = datasets.load_dataset(path, config or None, split=split)
    return [t for t in ds["text"] if t.strip()]


def check_corpus(source) -> None:
    """Fail early on missing corpus files, and on files or dirs that hold no text."""
    if source is None:
        raise ValueError("upstream needs a corpus: --corpus <text files> | pydoc | <datasets name>")
    for src in (source if isinstance(source, list) else [source]):
        src = str(src)
        if src == "pydoc":
            continue
        if Path(src).expanduser().exists():
            if not load_corpus(src)[0]:
                raise ValueError(f"corpus {src}: no text (empty, or only blank lines)")
            continue
        if ":" in src or ("/" in src and not src.startswith((".", "/", "~"))):
            import importlib.util
            if importlib.util.find_spec("datasets") is None:
                raise RuntimeError(f"corpus {src!r} needs the `datasets` package (or pass local text files)")
            continue
        raise FileNotFoundError(f"corpus {src!r}: no such file or dir (and not 'pydoc' or a datasets name)")
