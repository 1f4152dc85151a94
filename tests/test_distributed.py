"""One job over several processes (torch.distributed, gloo on CPU): DDP and FSDP2 runs against the
single-process run, CAP's banks, the library in users' own loops, torchrun with two "nodes" on
localhost, kill -9 of one rank and resume, and the refusals of bad set-ups."""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _dist_runs as R
from _train_fixtures import make_model, write_glue
from sparsebert.ops.mask import unpack_mask
from sparsebert.train import distributed as TD
from sparsebert.train import main

WORLD = 2


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a store port inside it can be drawn as the local port
    of a client that retries connecting before the server listens, and the client then connects to itself
    (TCP simultaneous open) while the server waits for it until its timeout."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", rng.randrange(max(1024, low // 2), low)))
            except OSError:
                continue
            return s.getsockname()[1]


# ---- the trainer and the library on 2 spawned processes ------------------------------------------

@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Single-process runs here; the same runs as 2-rank DDP / FSDP2 jobs and the library checks in one spawn,
    then the two examples of docs/DISTRIBUTED.md."""
    out = tmp_path_factory.mktemp("spawned")
    single = {name: R.run(name) for name in ("kap", "cap", "lock", "kap-bf16", "obert")}
    runs = [("ddp", "kap"), ("fsdp", "kap"), ("ddp", "cap"), ("fsdp", "lock"), ("fsdp", "kap-bf16"), ("ddp", "obert")]
    jobs = [("run", mode, name, str(out / f"{mode}-{name}.pt")) for mode, name in runs]
    jobs += [("global-mean", str(out / "global-mean.pt")), ("differ", str(out / "differ")),
             ("wrapped", str(out / "wrapped.pt"))]
    torch.multiprocessing.spawn(R.worker, args=(WORLD, free_port(), jobs), nprocs=WORLD)
    for index, name in enumerate(("ddp", "fsdp")):  # each example in fresh processes, as a user's script runs
        example = [("example", index, str(out / f"example-{name}.txt"))]
        torch.multiprocessing.spawn(R.worker, args=(WORLD, free_port(), example), nprocs=WORLD)
    dist = {f"{mode}-{name}": torch.load(out / f"{mode}-{name}.pt", weights_only=False) for mode, name in runs}
    return single, dist, out


def assert_same_run(single: dict, dist: dict, atol: float, events: int, swaps: int = 0) -> None:
    """Masks equal at every event up to `swaps` pairs of weights traded per matrix (one kept for one
    pruned: the same count, so the sparsity stays exact), losses, final metrics and weights close
    (the rows of a traded pair excepted: the trade itself changes them)."""
    assert len(single["masks"]) == len(dist["masks"]) == events + 1  # the masks of setup, then every event
    traded_rows = {}
    for event, (a, b) in enumerate(zip(single["masks"], dist["masks"])):
        for name in a:
            kept_a, kept_b = (unpack_mask(m[name], 8 * m[name].shape[-1]) for m in (a, b))
            assert kept_a.sum() == kept_b.sum(), f"kept count of {name} differs at event {event}"
            traded = int((kept_a & ~kept_b).sum())
            assert traded <= swaps, f"mask of {name} differs at event {event}: {traded} weights traded"
            rows = (kept_a != kept_b).any(-1)
            traded_rows[name] = traded_rows.get(name, rows) | rows
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert dist["final"] == single["final"]
    assert single["weights"].keys() == dist["weights"].keys()
    for name, value in single["weights"].items():
        module = name.rpartition(".")[0]  # its weight, mask, bias: indexed by the weight's rows
        keep = ~traded_rows[module] if module in traded_rows else torch.ones(len(value), dtype=torch.bool)
        torch.testing.assert_close(dist["weights"][name][keep], value[keep], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_of_half_the_batch_prune_as_one_process(spawned, mode):
    """KAP (magnitude top-k per matrix, 4 events, attention/hidden/logit distillation) at global batch 8:
    2 ranks x 4 against 1 process x 8. Masks bit-identical at every event, losses and weights close,
    final metrics equal; under FSDP2 the gathered optimizer state equals the single process's too."""
    single, dist, _ = spawned
    assert_same_run(single["kap"], dist[f"{mode}-kap"], atol=1e-6, events=4)
    if mode == "fsdp":
        state_a, state_b = single["kap"]["optimizer"]["state"], dist["fsdp-kap"]["optimizer"]["state"]
        assert state_a.keys() == state_b.keys()
        for pid in state_a:
            for key, value in state_a[pid].items():
                torch.testing.assert_close(state_b[pid][key], value, atol=1e-6, rtol=1e-4)


def test_ddp_obert_prunes_as_one_process(spawned):
    """The oBERT criterion under DDP: every rank's Fisher comes from the same all-reduced gradients (the
    ranks' masks are checked equal at every event by the pruner itself), so the masks are those of one
    process, up to saliency ties within rounding: the all-reduced gradients differ from one process's
    in their last bits, and the OBS update multiplies that by the inverse Fisher (the weights agree to
    5e-5, measured 1.4e-5 on weights of 0.09, not 1e-6). Measured: one pair of weights of 1,024 traded
    in one matrix at the last event, none before."""
    single, dist, _ = spawned
    assert_same_run(single["obert"], dist["ddp-obert"], atol=5e-5, events=4, swaps=1)


def test_fsdp_follows_the_precision_option(spawned):
    """bf16 autocast (the masked ops cast like nn.Linear) under FSDP2: the run of one process, within
    bf16 rounding."""
    single, dist, _ = spawned
    a, b = single["kap-bf16"], dist["fsdp-kap-bf16"]
    assert b["losses"] == pytest.approx(a["losses"], rel=2e-2) and a["losses"] != single["kap"]["losses"]
    assert len(b["masks"]) == 5 and b["final"].keys() == a["final"].keys()


def test_fsdp_compact_optimizer_state_is_the_single_process_state(spawned):
    """A locked pattern (Prune OFA downstream) trains with compact MaskedAdamW state; its FSDP2 shards,
    gathered, are the single-process compact state, and load back into the shards unchanged."""
    single, dist, _ = spawned
    assert_same_run(single["lock"], dist["fsdp-lock"], atol=1e-6, events=0)
    state_a, state_b = single["lock"]["optimizer"]["state"], dist["fsdp-lock"]["optimizer"]["state"]
    compact = [pid for pid, s in state_a.items() if "compact_mask" in s]
    assert compact and all(state_a[pid]["exp_avg"].dim() == 1 for pid in compact)
    for pid in state_a:
        for key, value in state_a[pid].items():
            torch.testing.assert_close(state_b[pid][key], value, atol=1e-6, rtol=1e-4)
    assert dist["fsdp-lock"]["restored_equal"]


def test_fsdp_pruner_never_gathers_the_weights(spawned):
    """Every collective of the FSDP2 pruning events moves integers (histograms, tie counts, digests) or
    packed mask bits, never a weight; the events report fewer bytes than an all-gather of |w| needs at
    a realistic size (bench_distributed measures MiniLM and BERT-base)."""
    _, dist, _ = spawned
    comm = dist["fsdp-kap"]["comm"]
    assert len(comm) >= 4
    for event in comm:
        assert event["seen"], "the sharded event ran no collective"
        for op, dtype, numel in event["seen"]:
            assert dtype in ("torch.int64", "torch.uint8"), (op, dtype, numel)
        assert event["stats"]["comm_bytes"] > 0 and event["stats"]["gather_bytes"] > 0
    # the masks moved are the packed bits: 1/32 of the fp32 weights
    mask_bytes = sum(n for op, dtype, n in comm[0]["seen"] if dtype == "torch.uint8")
    assert mask_bytes * 32 == comm[0]["stats"]["gather_bytes"]


def test_cap_banks_hold_the_global_batch(spawned):
    """CAP (movement scores, PrC/FiC/SnC banks) under DDP: every bank holds what the single-process
    run holds at the same global batch (indices and labels exactly; the frozen models' features exactly;
    the student's snapshot features to fp16 rounding), the sampler's state is the same, and the masks."""
    single, dist, _ = spawned
    a, b = single["cap"], dist["ddp-cap"]
    assert_same_run(a, b, atol=2e-4, events=6)
    assert a["banks"].keys() == b["banks"].keys() and len(a["banks"]) > 4
    for key, value in a["banks"].items():
        if key.endswith(".feats") and key.startswith("snapshot"):
            torch.testing.assert_close(b["banks"][key].float(), value.float(), atol=4e-3, rtol=0)
        else:
            assert torch.equal(b["banks"][key], value), key
    assert (a["banks"]["bank.pretrained.index"] >= 0).sum() == R.TRAIN  # the whole set was seen: both ranks' halves


def test_losses_are_means_over_the_global_batch(spawned):
    """Masked-LM, KD and hidden-state losses of ranks with different numbers of rows and masked tokens:
    inside global_batch, the gradient averaged over ranks is the single-process gradient."""
    _, _, out = spawned
    grads = torch.load(out / "global-mean.pt")
    torch.testing.assert_close(grads["ddp"], grads["single"], atol=1e-6, rtol=1e-5)


def test_ranks_with_different_masks_stop_with_a_clear_error(spawned):
    _, _, out = spawned
    for rank in range(WORLD):
        message = torch.load(Path(f"{out / 'differ'}.{rank}"))
        assert message.startswith("MasksDiffer: masks differ between ranks") and "rank(s) [1]" in message


def test_methods_set_up_on_a_ddp_wrapped_student(spawned):
    """CAP's setup on a DDP-wrapped student: a clear refusal while the movement scores would be new
    parameters DDP does not know; set up and trained when they exist before wrapping."""
    _, _, out = spawned
    wrapped = torch.load(out / "wrapped.pt", weights_only=False)
    assert "sparsebert.sparsify(model, {'scores': True}) before wrapping" in wrapped["refused"]
    assert len(wrapped["logs"]) == 4 and wrapped["sparsity"] > 0


@pytest.mark.parametrize("index,what", [(0, "DDP"), (1, "FSDP2")])
def test_distributed_md_examples_run(spawned, index, what):
    _, _, out = spawned
    printed = (out / f"example-{what.lower().rstrip('2')}.txt").read_text()
    assert printed.strip() == f"{what}: sparsity 0.900"


# ---- the CLI under torchrun ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A tiny BERT without dropout (ranks draw no random numbers, so runs compare exactly), its dense
    teacher, GLUE files, and the single-process run of the command every test launches."""
    from transformers import BertForSequenceClassification
    root = tmp_path_factory.mktemp("torchrun")
    model = make_model(root / "tiny")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    BertForSequenceClassification.from_pretrained(model, num_labels=2).save_pretrained(root / "teacher")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, root / "teacher")
    args = ["downstream", "--model", str(model), "--teacher", str(root / "teacher"), "--method", "sparsebert-kap",
            "--task", "sst2", "--data-dir", str(write_glue(root / "glue")), "--cache-dir", str(root / "cache"),
            "--max-len", "16", "--batch-size", "4", "--threads", "1", "--max-steps", "8",
            "--set", "training.checkpoint_every=2", "training.eval_every=4", "training.log_every=1", "method.events=4"]
    assert main(args + ["--run-dir", str(root / "single")]) == 0
    return {"root": root, "args": args, "single": root / "single"}


def torchrun(args: list[str], *launcher: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "sparsebert.train", *args],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def run_records(run: Path) -> tuple[list[dict], dict]:
    """(metrics.jsonl records, the masks of the final checkpoint)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    masks = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if k.endswith(".mask")}
    return records, masks


def assert_same_as_single(cli, run: Path) -> None:
    (want, want_masks), (got, got_masks) = run_records(cli["single"]), run_records(run)
    assert [r["kind"] for r in got] == [r["kind"] for r in want] and len(want) > 8
    for a, b in zip(want, got):
        b = {k: v for k, v in b.items() if k not in ("comm_bytes", "gather_bytes")}  # FSDP2's pruning events report them
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == (value if key in ("kind", "step", "epoch") or "/" in key else pytest.approx(value, rel=1e-5, abs=1e-7))
    assert want_masks.keys() == got_masks.keys() and want_masks
    assert all(torch.equal(want_masks[k], got_masks[k]) for k in want_masks)


def test_torchrun_two_nodes_on_localhost_run_one_job(cli):
    """torchrun --nnodes=2 --nproc_per_node=1, rendezvous on 127.0.0.1: one job (one run dir, written
    once) that equals the single-process run: masks, losses, metrics."""
    port, out = free_port(), cli["root"] / "two-nodes"
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=two-nodes"]
    nodes = [torchrun(cli["args"] + ["--out", str(out)], *launcher) for _ in range(2)]
    results = [finish(p) for p in nodes]
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    runs = list(out.iterdir())
    assert len(runs) == 1, runs
    printed = "".join(o for _, o, _ in results)
    assert printed.count("plan: ddp over 2 processes (gloo)") == 1 and "batch 4 (2 per rank)" in printed
    assert_same_as_single(cli, runs[0])


def test_kill_one_rank_then_resume(cli):
    """An FSDP2 job: kill -9 of rank 1 after step 5 takes it down; `torchrun ... --resume` ends with the
    masks and metrics of the uninterrupted run (of one process). The checkpoint of the 2 FSDP2 ranks
    also resumes in one process."""
    run = cli["root"] / "killed"
    port = free_port()
    rc, _, err = finish(torchrun(cli["args"] + ["--run-dir", str(run), "--distributed", "fsdp"], "--nproc_per_node=2",
                                 f"--master_port={port}", env={"SPARSEBERT_KILL_AT": "step:5", "SPARSEBERT_KILL_RANK": "1"}))
    assert rc != 0 and "SIGKILL" in err
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004" and not (run / "done.json").exists()
    one_process = cli["root"] / "killed-copy"
    shutil.copytree(run, one_process)
    rc, out, err = finish(torchrun(["--resume", str(run)], "--nproc_per_node=2", f"--master_port={free_port()}"))
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and (run / "done.json").is_file()
    assert_same_as_single(cli, run)
    assert main(["--resume", str(one_process), "--distributed", "auto"]) == 0  # from 2 FSDP2 ranks to 1 process
    assert_same_as_single(cli, one_process)


# ---- refusals --------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,env,message", [
    (["--batch-size", "5"], {"WORLD_SIZE": "2"}, "training.batch_size 5 is the global batch, split over 2 processes"),
    (["--dist-backend", "nccl"], {"WORLD_SIZE": "2"}, "--dist-backend nccl needs CUDA devices"),
    (["--distributed", "none"], {"WORLD_SIZE": "2"}, "would run 2 independent copies"),
    (["--distributed", "ddp"], {}, "this process was not started by torchrun"),
    (["--distributed", "fsdp", "--set", "method.criterion=obert"], {"WORLD_SIZE": "2"},
     "criterion 'obert' keeps gradient statistics per whole weight"),
    (["--distributed", "fsdp", "--model", "ALBERT"], {"WORLD_SIZE": "2"}, "no model family answers to model_type 'albert'"),
])
def test_bad_setups_are_refused_before_any_work(cli, tmp_path, monkeypatch, capsys, extra, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if not env:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    if "ALBERT" in extra:
        from transformers import AlbertConfig, AlbertForSequenceClassification
        AlbertForSequenceClassification(AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "albert")
        extra = [str(tmp_path / "albert") if x == "ALBERT" else x for x in extra]
    assert main(cli["args"] + ["--out", str(tmp_path / "runs")] + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_default_run_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([]) == 2
    assert "the embedded default run is a single-process demo" in capsys.readouterr().err


def test_every_rank_needs_an_example_of_every_batch(monkeypatch):
    monkeypatch.setattr(TD, "_current", TD.Dist("ddp", 0, 4))
    TD.check_tail(24, 8, 10, 3)  # no short last batch
    TD.check_tail(28, 8, 10, 4)  # 4 examples for 4 ranks
    with pytest.raises(TD.StageError, match="last batch of every epoch holds 2 of the 26"):
        TD.check_tail(26, 8, 10, 4)
    TD.check_tail(26, 8, 3, 4)  # never reaches the last batch


def test_the_job_ends_with_its_ddp_garbage_freed_before_the_group(monkeypatch):
    """A DDP wrapper dropped in a reference cycle: left to a later collection, its reducer would destroy
    the process group with the GIL held, which can deadlock gloo's teardown (docs/DISTRIBUTED.md).
    TD.stop() collects before destroying the group."""
    import gc
    import weakref

    import torch.distributed as dist
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    student = torch.nn.Linear(4, 2)  # held elsewhere, as a pruner holds the student's modules
    wrapper = torch.nn.parallel.DistributedDataParallel(student)
    wrapper(torch.randn(3, 4)).sum().backward()
    trainer = {"model": wrapper}
    trainer["callbacks"] = [trainer]  # a trainer and its callbacks: a cycle holding the wrapper
    freed, alive_at_destroy = weakref.ref(wrapper), []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (alive_at_destroy.append(freed() is not None), destroy()))
    monkeypatch.setattr(TD, "_current", TD.Dist("ddp", 0, 2, 0, "gloo"))
    gc.disable()
    try:
        del wrapper, trainer
        assert freed() is not None  # only a collection frees it
        TD.stop()
    finally:
        gc.enable()
    assert alive_at_destroy == [False] and not dist.is_initialized()
