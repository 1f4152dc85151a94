"""Run directories: resolved config, metrics (JSON lines), atomic verified checkpoints, exports.

    <run>/config.yaml          the resolved config (and config.json, with its hash)
    <run>/metrics.jsonl        one JSON object per train log / evaluation
    <run>/checkpoints/step-N/  model.safetensors, optimizer.safetensors + .json, method.safetensors + .json,
                               trainer.json, rng.safetensors, manifest.json (size + sha256 of each file)
    <run>/checkpoints/latest   the name of the newest complete checkpoint
    <run>/model/               the final model for plain transformers (+ tokenizer)
    <run>/done.json            final metrics; its presence marks the run complete
    <run>/report.md, *.png     the report

A checkpoint is written into a temp dir beside its final name, every file fsynced, then renamed;
`latest` is replaced atomically after that, so a kill at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from . import config as C
from .errors import RunError
from .state import join_tensors, model_tensors, rng_state, set_rng_state, split_tensors


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kill_hook(point: str, step: int, where: str = "") -> None:
    """Test hook: SPARSEBERT_KILL_AT=[<run dir name>@]<point>:<step> SIGKILLs this process there
    (point: step = after that step's checkpoint/eval, checkpoint = halfway through writing one)."""
    spec = os.environ.get("SPARSEBERT_KILL_AT")
    if not spec:
        return
    name, _, at = spec.rpartition("@")
    if at == f"{point}:{step}" and (not name or name == where):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class Run:
    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        self.ckpt_dir = self.dir / "checkpoints"

    # ---- creation / resume -----------------------------------------------------------------------
    @staticmethod
    def new_path(cfg: dict) -> Path:
        """run.dir when given, else a fresh <out_dir>/<time>-<stage>-<method>."""
        if cfg["run"].get("dir"):
            return Path(cfg["run"]["dir"]).expanduser()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{cfg['stage']}"
        if cfg["stage"] != "pipeline":
            name += f"-{cfg['method']['name']}"
        base = path = Path(cfg["run"]["out_dir"]).expanduser() / name
        n = 1
        while path.exists():
            n += 1
            path = Path(f"{base}-{n}")
        return path

    @classmethod
    def create(cls, cfg: dict, path: str | os.PathLike | None = None) -> "Run":
        run = cls(path if path is not None else cls.new_path(cfg))
        if (run.dir / "config.json").exists():
            raise RunError(f"{run.dir} already holds a run; pass --resume {run.dir} to continue it")
        run.dir.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)
        return run

    def write_config(self, cfg: dict) -> None:
        atomic_write_text(self.dir / "config.yaml", C.dump(cfg))
        atomic_write_text(self.dir / "config.json",
                          json.dumps({"config": cfg, "hash": C.config_hash(cfg)}, indent=1, default=str))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        run = cls(path)
        if not run.dir.is_dir():
            raise RunError(f"resume dir {run.dir} does not exist")
        if not (run.dir / "config.json").is_file():
            raise RunError(f"{run.dir} is not a sparsebert run dir (no config.json)")
        return run

    def saved_config(self) -> dict:
        try:
            return json.loads((self.dir / "config.json").read_text())["config"]
        except (OSError, ValueError, KeyError) as e:
            raise RunError(f"{self.dir}/config.json is unreadable: {e}") from None

    def check_same_config(self, cfg: dict) -> None:
        diff = C.differences(C.comparable(self.saved_config()), C.comparable(cfg))
        if diff:
            raise RunError(f"resume dir {self.dir} was made with a different config:\n  "
                           + "\n  ".join(f"{d}  (saved vs now)" for d in diff[:20]))

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    # ---- metrics ---------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                pass
        return out

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop what was logged after the checkpoint, so the log reads as one run."""
        keep = [r for r in self.metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, step: int, model, optimizer, method, trainer_state: dict, keep: int = 1,
                        scaler=None) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_dir / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.ckpt_dir, prefix=f".step-{step:08d}.", suffix=".tmp"))
        try:
            save_file(model_tensors(model), str(tmp / "model.safetensors"))
            opt_tensors: dict = {}
            opt_meta = split_tensors(optimizer.state_dict(), opt_tensors, "opt")
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
            m_tensors: dict = {}
            m_meta = split_tensors(method.state_dict(), m_tensors, "method")
            save_file(m_tensors, str(tmp / "method.safetensors"))
            (tmp / "method.json").write_text(json.dumps(m_meta))
            r_tensors, r_meta = rng_state()
            save_file(r_tensors, str(tmp / "rng.safetensors"))
            state = {**trainer_state, "rng": r_meta, "step": step}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            (tmp / "trainer.json").write_text(json.dumps(state, default=float))
            kill_hook("checkpoint", step, self.dir.name)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                        for name in files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.ckpt_dir / "latest", final.name)
        self.prune_checkpoints(max(1, keep))  # the one just written stays until the run is done
        return final

    def prune_checkpoints(self, keep: int) -> None:
        """Keep the newest `keep` checkpoints (none: the checkpoints dir goes) and no temp dirs."""
        if not self.ckpt_dir.is_dir():
            return
        if keep <= 0:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            return
        whole = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
        for p in whole[:max(0, len(whole) - keep)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.ckpt_dir.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        if not path.is_dir():
            raise RunError(f"checkpoint {path} named by {pointer} is missing")
        return path

    @staticmethod
    def verify(path: Path) -> None:
        """Size and sha256 of every file against the manifest; refuses a corrupted checkpoint."""
        manifest_path = path / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"checkpoint {path} is corrupted: manifest unreadable ({e})") from None
        for name, want in manifest.items():
            f = path / name
            if not f.is_file():
                raise RunError(f"checkpoint {path} is corrupted: {name} is missing")
            size = f.stat().st_size
            if size != want["size"]:
                raise RunError(f"checkpoint {path} is corrupted: {name} has {size} bytes, manifest says {want['size']}")
            if sha256_file(f) != want["sha256"]:
                raise RunError(f"checkpoint {path} is corrupted: {name} fails its sha256 check")

    @staticmethod
    def load_checkpoint(path: Path, model, optimizer, method, scaler=None) -> dict:
        """Restore everything into already-built objects; returns the trainer state (step, ...)."""
        Run.verify(path)
        state = json.loads((path / "trainer.json").read_text())
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise RunError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        optimizer.load_state_dict(join_tensors(json.loads((path / "optimizer.json").read_text()),
                                               load_file(str(path / "optimizer.safetensors"))))
        method.load_state_dict(join_tensors(json.loads((path / "method.json").read_text()),
                                            load_file(str(path / "method.safetensors"))))
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
        return state

    def finish(self, results: dict) -> None:
        atomic_write_text(self.dir / "done.json", json.dumps(results, indent=1, default=float))

    def results(self) -> dict:
        return json.loads((self.dir / "done.json").read_text())
