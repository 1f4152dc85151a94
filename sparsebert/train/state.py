"""Checkpoint state as files: nested optimizer/method state dicts as safetensors + JSON, model
tensors safetensors accepts, and the RNG states of every generator a run draws from."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def split_tensors(obj: Any, tensors: dict, prefix: str = "t") -> Any:
    """Replace every tensor in a nested structure by {"__tensor__": key}, collecting them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[split_tensors(k, tensors, prefix), split_tensors(v, tensors, prefix)]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [split_tensors(v, tensors, prefix) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def join_tensors(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [join_tensors(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
    return obj


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied (shared) tensors copied apart: safetensors refuses shared storage."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    return out


def rng_state() -> tuple[dict, dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                             float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    random.setstate((meta["python"][0], tuple(meta["python"][1]), meta["python"][2]))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
