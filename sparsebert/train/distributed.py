"""One job over the processes torchrun starts: the process group, the student wrapped in DDP or
FSDP2, this rank's rows of the global batch, evaluation shared by the ranks, rank 0 writing the run
dir, and checkpoints whose content does not depend on the world size.

Under torchrun (`WORLD_SIZE` > 1) every rank runs the same stage code; `training.batch_size` is the
global batch, split evenly over the ranks in the single-process epoch order, so a run is the
single-process run (see docs/DISTRIBUTED.md). Without torchrun nothing here does anything.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import inspect
import logging
import os
import sys
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as D
from ..families import UnknownFamily, family_of, family_of_type
from ..sparsity.criteria import CRITERIA
from .errors import ConfigError, StageError
from .runs import Run

MODES = ("auto", "none", "ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")


@dataclasses.dataclass(frozen=True)
class Dist:
    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, rows: int) -> tuple[slice, list[int]]:
        """This rank's rows of a global batch of `rows` (consecutive, in rank order) and every rank's count."""
        sizes = [rows // self.world + (r < rows % self.world) for r in range(self.world)]
        start = sum(sizes[:self.rank])
        return slice(start, start + sizes[self.rank]), sizes

    def describe(self, batch_size: int) -> str:
        return (f"distributed: {self.mode} over {self.world} processes ({self.backend}); per-rank batch "
                f"{batch_size // self.world} x {self.world} = global batch {batch_size}")


SINGLE = Dist()
_current = SINGLE


def current() -> Dist:
    return _current


def launched_world() -> int:
    """Processes of the job as torchrun (or any launcher setting WORLD_SIZE) started it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def check(run: dict, world: int | None = None) -> str:
    """The mode a run gets with `world` processes (default: as launched), or ConfigError saying why not."""
    world = launched_world() if world is None else world
    mode, backend = run.get("distributed", "auto"), run.get("dist_backend", "auto")
    if mode not in MODES:
        raise ConfigError(f"run.distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"run.dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if world <= 1:
        if mode in ("ddp", "fsdp") and "WORLD_SIZE" not in os.environ:
            raise ConfigError(f"--distributed {mode} runs one job over the processes torchrun starts, and this "
                              "process was not started by torchrun: launch `torchrun --nproc_per_node=N -m "
                              "sparsebert.train ...` (or pass --distributed auto)")
        return "none"
    if mode == "none":
        raise ConfigError(f"--distributed none under torchrun would run {world} independent copies of the job: "
                          "drop it (ddp is the default under torchrun) or run without torchrun")
    device = str(run.get("device", "auto"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "nccl" and not cuda:
        raise ConfigError("--dist-backend nccl needs CUDA devices (one per rank), and this run is on the CPU: "
                          "use --dist-backend gloo (the default on CPU)")
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} under torchrun: every rank uses its local GPU (LOCAL_RANK); "
                          "pass --device cuda or auto")
    return "ddp" if mode == "auto" else mode


LAUNCH_KEYS = ("distributed", "dist_backend")  # how this launch runs, not what the run computes


def launch_settings(saved: dict, user: dict) -> tuple[dict, dict]:
    """(a resumed run's config with the distributed settings this launch gives (run.distributed,
    run.dist_backend), the other overrides): a run may continue under another launch."""
    run = dict(user.get("run") or {})
    given = {k: run.pop(k) for k in LAUNCH_KEYS if k in run}
    rest = {**user, "run": run} if run else {k: v for k, v in user.items() if k != "run"}
    for section in [saved["run"]] + [s["run"] for s in (saved.get("stages") or {}).values()]:
        section.update(given)
    return saved, rest


def start(run: dict) -> Dist:
    """The process group of this job from the torchrun environment (nothing in a single process);
    ranks other than 0 then print only errors."""
    global _current
    mode = check(run)
    if mode == "none":
        _current = SINGLE
        return _current
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = str(run.get("device", "auto"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = run.get("dist_backend", "auto")
    backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _current = Dist(mode, dist.get_rank(), dist.get_world_size(), local_rank, backend)
    if not _current.is_main:
        _silence()
    return _current


def stop() -> None:
    global _current
    if _current.active and dist.is_initialized():
        gc.collect()  # a DDP reducer freed after the group would destroy it with the GIL held (docs/DISTRIBUTED.md)
        dist.destroy_process_group()
    _current = SINGLE


def _silence() -> None:
    """Ranks other than 0 keep stderr for their errors and drop the rest (prints, warnings, logs)."""
    sys.stdout = open(os.devnull, "w")
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("sparsebert").setLevel(logging.ERROR)


def error_prefix() -> str:
    return f"[rank {_current.rank}] " if _current.active and not _current.is_main else ""


def from_main(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result (or its exception) on every rank."""
    if not _current.active:
        return fn()
    box: list = [None]
    if _current.is_main:
        try:
            box[0] = (True, fn())
        except Exception as e:  # every rank raises it, so the job stops with rank 0's message
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def preflight(cfg: dict, model_exists: bool = True) -> None:
    """What a run needs from the job torchrun launched (checked before the process group exists): a
    mode that fits, a global batch that splits evenly over the ranks, and under FSDP a known model
    family (when the model exists: a pipeline's later stages train what its first ones write) and a
    pattern and criterion that run on shards."""
    mode, world = check(cfg["run"]), launched_world()
    if world <= 1:
        return
    bs = cfg["training"]["batch_size"]
    if bs % world:
        raise ConfigError(f"training.batch_size {bs} is the global batch, split over {world} processes: it must be a "
                          f"multiple of {world} (per-rank batch = batch_size / world size)")
    if mode == "fsdp" and model_exists:
        from transformers import AutoConfig

        from .models import model_path
        try:
            family_of_type(AutoConfig.from_pretrained(model_path(cfg["model"]["name"])).model_type)
        except UnknownFamily as e:
            raise StageError(f"--distributed fsdp shards the encoder layers of a known model family: {e}; "
                             "or use --distributed ddp") from None
        pattern = cfg["method"].get("pattern")
        if pattern in ("structured", "block"):
            raise StageError(f"method pattern {pattern!r} ranks whole matrices and does not run on FSDP-sharded weights: "
                             "use --distributed ddp")
        criterion = cfg["method"].get("criterion")
        if criterion in CRITERIA and CRITERIA.get(criterion).stats is not None:
            raise StageError(f"method criterion {criterion!r} keeps gradient statistics per whole weight and does not "
                             "run on FSDP-sharded weights: use --distributed ddp")


def check_tail(train_size: int, batch_size: int, total_steps: int, steps_per_epoch: int) -> None:
    """Every rank needs at least one example in every batch (a BERT forward takes no empty batch)."""
    tail, world = train_size % batch_size, _current.world
    if world > 1 and 0 < tail < world and total_steps >= steps_per_epoch:
        raise StageError(f"the last batch of every epoch holds {tail} of the {train_size} training examples, fewer than "
                         f"the {world} processes: change data.max_train_examples or the batch size so that it holds "
                         f"none or at least {world}")


# ---- the student -------------------------------------------------------------------------------------

def wrap(model: nn.Module, device: torch.device, unused_parameters: bool = False) -> nn.Module:
    """The student as this job trains it: DistributedDataParallel, or FSDP2 fully_shard on every encoder
    layer (from the model-family table) and on the whole model. Call after the method's setup (which
    sparsifies) and before its optimizer (which must see the sharded parameters). `unused_parameters`:
    some trainable parameters get no gradient (a bare encoder's pooler under a representation loss)."""
    d = _current
    if d.mode == "ddp":
        # No buffer broadcast: the masks are the same on every rank by construction (and checked after
        # every pruning event), and broadcasting them every step would move 1/32 of the weights' bytes.
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})  # the name before torch 2.13
        return ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=unused_parameters, **no_sync)
    if d.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        try:
            layers = family_of(model).layer_list(model)
        except UnknownFamily as e:
            raise StageError(f"--distributed fsdp shards the encoder layers of a known model family: {e}") from None
        mesh = init_device_mesh(device.type, (d.world,))
        # transformers' outputs are views; nothing here changes them in place, which is what FSDP2 warns of
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def take_rows(batch: dict, rows: slice, total: int) -> dict:
    """This rank's rows of a collated global batch."""
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == total else v
            for k, v in batch.items()}


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """Per-rank values (the loss and its terms) averaged over the ranks: inside sparsebert.distributed.
    global_batch each rank's value is its share, so this is the global batch's."""
    if not _current.active:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=D.comm_device())
    dist.all_reduce(t)
    return (t / _current.world).tolist()


def shard_map(items: Sequence, fn: Callable[[Any], Any]) -> list:
    """[fn(item) for item in items], the items shared round-robin by the ranks, the results gathered
    in order on every rank. Every rank calls fn equally often (an FSDP forward is a collective): a
    rank short of items repeats its last one and drops the result."""
    d = _current
    if not d.active:
        return [fn(item) for item in items]
    mine = list(range(d.rank, len(items), d.world))
    rounds = -(-len(items) // d.world)
    results = {}
    for j in range(rounds):
        i = mine[j] if j < len(mine) else (mine[-1] if mine else 0)
        out = fn(items[i]) if items else None
        if j < len(mine):
            results[i] = out
    every: list = [None] * d.world
    dist.all_gather_object(every, results)
    merged = {i: r for part in every for i, r in part.items()}
    return [merged[i] for i in range(len(items))]


# ---- rank 0 writes the run dir -------------------------------------------------------------------

class FollowerRun(Run):
    """The run dir as ranks other than 0 see it: they read it (resume, done markers), never write it."""

    @classmethod
    def create(cls, cfg: dict, path=None) -> "FollowerRun":
        return cls(path if path is not None else cls.new_path(cfg))

    def write_config(self, cfg: dict) -> None: ...
    def log(self, record: dict) -> None: ...
    def truncate_metrics(self, step: int) -> None: ...
    def save_checkpoint(self, *args, **kwargs) -> None: ...
    def prune_checkpoints(self, keep: int) -> None: ...
    def finish(self, results: dict) -> None: ...


def run_class() -> type[Run]:
    return Run if _current.is_main else FollowerRun


def create_run(cfg: dict, path) -> Run:
    """Rank 0 creates the run dir (its refusal stops every rank); every rank gets its view of it."""
    return run_class()(from_main(lambda: Run.create(cfg, path).dir))
