"""Training checkpoints: everything needed to resume a stage exactly, and nothing of the backbone.

A checkpoint folder ``step-NNNNNNNN/`` holds

* ``adapters.safetensors`` — every weight that is not the backbone's;
* ``optimizer.safetensors`` + ``optimizer.json`` — AdamW moments as tensors, hyperparameters as JSON;
* ``rng.safetensors`` — torch generator states (CPU, and CUDA where present);
* ``state.json`` — step, scheduler position, data position, Python and NumPy generator states,
  the backbone digest, and metrics of the last step.

Everything mm writes is safetensors or JSON: no pickle. A folder is written under a temporary name
and renamed when complete, so a kill mid-write leaves the previous checkpoint intact; only the last
``keep_last`` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mm._io import atomic_dir

__all__ = ["latest_checkpoint", "load_train_state", "prune_checkpoints", "save_train_state"]

_STEP = re.compile(r"^step-(\d{8})$")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(
    folder: str | Path,
    *,
    step: int,
    adapters: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler_step: int,
    data_state: dict[str, Any],
    backbone_digest: str,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/step-NNNNNNNN`` atomically and return its path."""
    path = Path(folder) / f"step-{step:08d}"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    state = {
        "step": step,
        "scheduler_step": scheduler_step,
        "data": data_state,
        "python_random": _jsonable(random.getstate()),
        "numpy_random": _jsonable(np.random.get_state()),
        "backbone_digest": backbone_digest,
        "metrics": metrics or {},
    }
    with atomic_dir(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in adapters.items()}, tmp / "adapters.safetensors"
        )
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer | np.floating):
        return value.item()
    return value


def _unjson(value: Any) -> Any:
    if isinstance(value, dict) and "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=value["dtype"])
    if isinstance(value, list):
        return tuple(_unjson(v) for v in value)
    return value


def load_train_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and generator states from a checkpoint; return its ``state.json`` plus
    ``adapters`` (the weights, for the caller to load into the model)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_unjson(state["python_random"]))
    np_state = _unjson(state["numpy_random"])
    np.random.set_state(np_state)
    state["adapters"] = load_file(path / "adapters.safetensors")
    return state


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (temporary folders of a killed write are ignored)."""
    found = _checkpoints(Path(folder))
    return found[-1][1] if found else None


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary folders)."""
    folder = Path(folder)
    found = _checkpoints(folder)
    for _, p in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    if folder.is_dir():
        for p in folder.glob(".step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
