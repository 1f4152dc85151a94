"""Pruning runs of the trainer on a tiny BERT, in one process or as a rank of a torch.distributed job
(gloo), recording what the distributed tests compare: masks at every pruning event, the step losses,
the final weights and optimizer state (full, as a checkpoint holds them), the final metrics, CAP's
banks, and the collectives the pruner ran."""
from __future__ import annotations

import faulthandler
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import tinybert
from sparsebert.data import glue
from sparsebert.methods import MethodContext, get_method
from sparsebert.sparsity import masked_modules
from sparsebert.train import checkpointing as TC
from sparsebert.train import distributed as TD
from sparsebert.train.evaluation import eval_task
from sparsebert.train.trainer import Callback, Trainer

TRAIN, DEV, BATCH, STEPS = 24, 10, 8, 6
METHODS = {
    # magnitude, per-matrix top-k on a cubic schedule (4 events), KAP's distillation (attention, hidden, soft CE)
    "kap": ("sparsebert-kap", {"sparsity": 0.75, "events": 4, "end_frac": 0.67}),
    # KAP with the oBERT criterion: its Fisher from the all-reduced gradients, the same on every rank
    "obert": ("sparsebert-kap", {"sparsity": 0.75, "events": 4, "end_frac": 0.67, "criterion": "obert",
                                 "criterion_kwargs": {"block": 8}}),
    # movement scores, every-step top-k (Sanh), PrC + FiC + SnC memory banks
    "cap": ("cap", {"sparsity": 0.5, "warmup_frac": 0.2, "cooldown_frac": 0.2, "score_init": "magnitude",
                    "contrastive": {"negatives": 16, "max_snapshots": 2}}),
    # a locked pattern (downstream Prune OFA: compact optimizer state) on a pruned student
    "lock": ("prune-ofa", {"stage": "downstream"}),
}


def features(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(5, tinybert.VOCAB, (length,), generator=g)
        ids[0] = 2
        out.append({"input_ids": ids.numpy(), "token_type_ids": torch.zeros(length, dtype=torch.long).numpy(),
                    "label": int(ids[1] % 2), "index": i})
    return out


def make_batch(feats: list[dict], step: int) -> dict:
    from sparsebert.data.collate import collate
    return collate(feats, 0, "classification")


class Record(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, trainer, log) -> None:
        self.losses.append(log.loss)


def run(name: str, out: Path | None = None) -> dict:
    """The run `name` (a METHODS key, "-bf16" for bf16 autocast) in this process (as one rank when a
    process group is up); rank 0's results."""
    name, _, precision = name.partition("-")
    precision = precision or "fp32"
    method_name, options = METHODS[name]
    d = TD.current()
    torch.manual_seed(0)
    student = tinybert.classifier(0, attn_implementation="eager")
    if name == "lock":  # a student pruned upstream: half its encoder weights are zero
        with torch.no_grad():
            for layer in student.bert.encoder.layer:
                for m in layer.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.mul_(torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(7)) > 0.5)
    teacher = tinybert.classifier(1, attn_implementation="eager").eval().requires_grad_(False)
    pretrained = tinybert.encoder(2).eval().requires_grad_(False)
    train, dev = features(TRAIN, 0), {"dev": features(DEV, 1)}
    total = STEPS
    method = get_method(method_name, **options)
    ctx = MethodContext(student=student, teacher=teacher, pretrained=pretrained, objective="classification",
                        num_labels=2, total_steps=total, steps_per_epoch=TRAIN // BATCH, train_size=TRAIN,
                        device=torch.device("cpu"))
    method.setup(ctx)
    ctx.student = TD.wrap(student, torch.device("cpu"))
    masks, comm = [], []

    def snapshot():
        masks.append({n: m.mask.clone() for n, m in masked_modules(student).items()})

    snapshot()
    after_step, prune = method.after_step, method.pruner.prune

    def recorded_after_step(step):
        events = after_step(step)
        if events:
            snapshot()
        return events

    def watched_prune(value):
        with collectives() as seen:
            stats = prune(value)
        comm.append({"seen": seen, "stats": stats})
        return stats

    method.after_step, method.pruner.prune = recorded_after_step, watched_prune
    task = glue.get_task("sst2")
    record = Record()
    training = {"batch_size": BATCH, "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0, "seed": 0,
                "group_by_length": False}
    trainer = Trainer(method=method, model=ctx.student, train_features=train, make_batch=make_batch, training=training,
                      total_steps=total, steps_per_epoch=TRAIN // BATCH, device=torch.device("cpu"), precision=precision,
                      evaluate=lambda: eval_task(student, task, dev, 0, 4, torch.device("cpu"), precision),
                      callbacks=[record], dist=d)
    final = trainer.fit()
    model, optimizer, _ = TC.for_checkpoint(ctx.student, trainer.optimizer)
    result = {"masks": masks, "losses": record.losses, "final": final, "comm": comm,
              "weights": {k: v.detach().clone() for k, v in model.state_dict().items()} if d.is_main else None,
              "optimizer": optimizer.state_dict() if d.is_main else None}
    if method.contrastive is not None:
        result["banks"] = {k: v.clone() for k, v in method.contrastive.state_dict().items() if torch.is_tensor(v)}
    if name == "lock" and d.mode == "fsdp":  # the full state loads back into the shards
        _, restore = TC.for_restore(ctx.student, trainer.optimizer)
        before = [{k: TC.D.local(v).clone() for k, v in s.items() if torch.is_tensor(v)}
                  for s in trainer.optimizer.state.values()]
        full = TC._full_optimizer_state(trainer.optimizer)
        restore.load_state_dict(full)
        after = [{k: TC.D.local(v) for k, v in s.items() if torch.is_tensor(v)} for s in trainer.optimizer.state.values()]
        result["restored_equal"] = all(torch.equal(a[k], b[k]) for a, b in zip(after, before) for k in b)
    if out is not None and d.is_main:
        torch.save(result, out)
    return result


class collectives:
    """Records (op, dtype, numel) of the torch.distributed collectives run inside it."""
    OPS = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "all_to_all")

    def __enter__(self):
        self.seen, self.saved = [], {}
        for op in self.OPS:
            fn = self.saved[op] = getattr(dist, op)

            def wrapped(*args, _fn=fn, _op=op, **kwargs):
                tensors = [a for a in args if torch.is_tensor(a)]
                self.seen.append((_op, str(tensors[-1].dtype), int(tensors[-1].numel())))
                return _fn(*args, **kwargs)
            setattr(dist, op, wrapped)
        return self.seen

    def __exit__(self, *exc):
        for op, fn in self.saved.items():
            setattr(dist, op, fn)


def global_mean(out: Path) -> None:
    """Losses of ranks holding different numbers of masked tokens (and examples), inside global_batch:
    the gradient averaged over ranks against the single-process gradient of the global batch."""
    from sparsebert import distributed as D
    from sparsebert.distill.kd import hidden_mse, kd_loss
    from sparsebert.objectives import task_loss
    torch.manual_seed(0)
    w = torch.randn(16, 8, requires_grad=True)
    x, y = torch.randn(7, 5, 16), torch.randint(0, 8, (7, 5))
    y[torch.rand(7, 5, generator=torch.Generator().manual_seed(1)) < 0.6] = -100
    mask = (torch.rand(7, 5, generator=torch.Generator().manual_seed(2)) < 0.7).long()

    def loss(rows):
        logits = x[rows] @ w
        keep = y[rows] != -100
        return (task_loss(logits, {"labels": y[rows]}, "mlm") + kd_loss(logits[keep], logits[keep].detach() * 0.5)
                + hidden_mse((logits,), (logits.detach() * 0.9,), [0], mask[rows]))

    loss(slice(0, 7)).backward()
    single = w.grad.clone()
    w.grad = None
    rank, world = D.rank(), D.world_size()
    sizes = [4, 3]  # uneven rows too
    start = sum(sizes[:rank])
    with D.global_batch(sizes[rank], sizes=sizes):
        loss(slice(start, start + sizes[rank])).backward()
    dist.all_reduce(w.grad)
    if rank == 0:
        torch.save({"single": single, "ddp": w.grad / world}, out)


def masks_differ(out: Path) -> None:
    """Rank 1 holds other weights than rank 0: the pruner stops both with MasksDiffer."""
    from sparsebert.sparsity import Pruner, sparsify
    student = tinybert.classifier(dist.get_rank())
    pruner = Pruner(sparsify(student), "magnitude", "tensor", None)
    try:
        pruner.prune(0.5)
        message = None
    except Exception as e:  # noqa: BLE001  (the test checks the type by name)
        message = f"{type(e).__name__}: {e}"
    torch.save(message, Path(f"{out}.{dist.get_rank()}"))


def wrapped_setup(out: Path) -> None:
    """CAP set up on a DDP-wrapped student: refused while its movement scores do not exist (DDP would not
    synchronize them), then trained when they were made before wrapping."""
    from sparsebert.sparsity import sparsify
    torch.manual_seed(0)
    student = tinybert.classifier(0)
    teacher = tinybert.classifier(1).eval().requires_grad_(False)
    pretrained = tinybert.encoder(2).eval().requires_grad_(False)
    options = {"contrastive": {"negatives": 8, "max_snapshots": 2}, "score_init": "magnitude"}
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    try:
        get_method("cap", **options).setup(tinybert.context(ddp, teacher, pretrained))
        refused = None
    except ValueError as e:
        refused = str(e)
    student = tinybert.classifier(0)
    sparsify(student, {"scores": True})
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    method = get_method("cap", **options)
    logs = tinybert.train(method, tinybert.context(ddp, teacher, pretrained, total_steps=4), 4)
    if dist.get_rank() == 0:
        torch.save({"refused": refused, "logs": logs, "sparsity": method.pruner.sparsity}, out)


def example(index: int, out: Path) -> None:
    """The index-th python example of docs/DISTRIBUTED.md, run as written (it makes its own group)."""
    import contextlib
    import io
    import re
    doc = Path(__file__).resolve().parents[1] / "docs" / "DISTRIBUTED.md"
    block = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, str(doc), "exec"), {"__name__": "__main__"})
    if printed.getvalue():
        Path(out).write_text(printed.getvalue())


def worker(rank: int, world: int, port: int, jobs: list[tuple]) -> None:
    """One rank: each job is ("run", mode, run name, output file), ("global-mean", out), ("differ", out),
    ("wrapped", out) or ("example", index, out), on the store at `port`; an example makes its own process
    group, so it runs alone in its processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a rank that never arrives fails the job in 5 minutes, not the default 30, and every rank still
    # in a job after 4 prints its stack
    dist.distributed_c10d.default_pg_timeout = timedelta(minutes=5)
    steps = {"global-mean": global_mean, "differ": masks_differ, "wrapped": wrapped_setup}
    try:
        for job in jobs:
            faulthandler.dump_traceback_later(240)
            if job[0] == "example":
                example(job[1], job[2])
                continue
            TD.start({"distributed": job[1] if job[0] == "run" else "ddp", "dist_backend": "gloo", "device": "cpu"})
            if job[0] == "run":
                run(job[2], Path(job[3]))
            else:
                steps[job[0]](Path(job[1]))
    finally:
        faulthandler.cancel_dump_traceback_later()
        TD.stop()
