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

Under FSDP2 the weights and AdamW moments are sharded DTensors. :func:`full_tensors` and
:func:`full_optimizer_state` gather them whole (collectives: every rank calls them, in the same order)
so that one rank writes the very format a single process writes; :func:`shard_like` and
:func:`load_optimizer_state` cut whole tensors read from a checkpoint back into each rank's shards.
A checkpoint therefore resumes on any number of processes, sharded or not.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mm._io import atomic_dir

__all__ = [
    "full_optimizer_state",
    "full_tensors",
    "latest_checkpoint",
    "load_optimizer_state",
    "load_train_state",
    "prune_checkpoints",
    "save_train_state",
    "shard_like",
]

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
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler_step: int,
    data_state: dict[str, Any],
    backbone_digest: str,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/step-NNNNNNNN`` atomically and return its path.

    ``optimizer`` is the optimizer itself or a state dict of whole tensors in its layout (what
    :func:`full_optimizer_state` gathers from a sharded one).
    """
    path = Path(folder) / f"step-{step:08d}"
    state_dict = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    opt_tensors, opt_meta = _flatten_optimizer(state_dict)
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


def load_train_state(path: str | Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore optimizer and generator states from a checkpoint; return its ``state.json`` plus
    ``adapters`` (the weights, for the caller to load into the model).

    With ``optimizer=None`` the optimizer's state dict (whole tensors) is returned as ``optimizer``
    instead, for the caller to load (a sharded optimizer: see :func:`load_optimizer_state`).
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    meta = json.loads((path / "optimizer.json").read_text())
    opt_state = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta)
    if optimizer is None:
        state["optimizer"] = opt_state
    else:
        optimizer.load_state_dict(opt_state)
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


# ---------------------------------------------------------------------- sharded (FSDP2) state
def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_tensors(tensors: Mapping[str, torch.Tensor], *, keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``tensors``; sharded (DTensor) ones are gathered first.

    Gathering is a collective: under FSDP every rank must call this with the same names, and it
    visits them in sorted order so that all ranks gather the same tensor at the same time. A rank
    with ``keep=False`` takes part in the gathers but keeps nothing (one whole tensor at a time
    passes through its memory) and gets ``{}``.
    """
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        t = tensors[name].detach()
        if _is_dtensor(t):
            t = t.full_tensor()
        if keep:
            out[name] = t.cpu()
    return out


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # The optimizer's state dict numbers parameters consecutively over its groups, in group order.
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, *, keep: bool = True) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with every sharded moment gathered whole (see :func:`full_tensors`).

    A collective under FSDP; ranks with ``keep=False`` get ``None``.
    """
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for idx in sorted(state_dict["state"]):
        entry = state_dict["state"][idx]
        tensors = {k: v for k, v in entry.items() if torch.is_tensor(v)}
        whole = full_tensors(tensors, keep=keep)
        if keep:
            state[idx] = {k: whole.get(k, v) for k, v in entry.items()}
    return {"state": state, "param_groups": state_dict["param_groups"]} if keep else None


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` cut like ``like``: this rank's shard when ``like`` is a DTensor, else ``whole``.

    Every rank holds ``whole`` (each reads the checkpoint), so each takes its own piece locally,
    without communication.
    """
    if not _is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    if tuple(whole.shape) != tuple(like.shape):
        raise ValueError(f"a checkpoint tensor of shape {tuple(whole.shape)} cannot fill {tuple(like.shape)}")
    whole = whole.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Load a state dict of whole tensors (what :func:`load_train_state` returns) into an optimizer
    whose parameters may be sharded: each moment of a DTensor parameter is cut like the parameter."""
    params = _optimizer_params(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        if int(idx) >= len(params):
            raise ValueError(
                f"the checkpoint has optimizer state for parameter {idx}; the optimizer has {len(params)}"
            )
        p = params[int(idx)]
        state[int(idx)] = {
            k: shard_like(v, p) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in entry.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


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
