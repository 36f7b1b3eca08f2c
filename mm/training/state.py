"""Training checkpoints: everything needed to resume a stage exactly, and nothing of the backbone.

A checkpoint folder ``step-NNNNNNNN/`` holds

* ``adapters.safetensors`` — every weight that is not the backbone's;
* ``optimizer.safetensors`` + ``optimizer.json`` — AdamW moments as tensors, hyperparameters as JSON;
* ``rng.safetensors`` — torch generator states (CPU, and CUDA where present);
* ``state.json`` — step, scheduler position, data position (with the data's bad-sample counters),
  Python and NumPy generator states, the backbone digest, metrics of the last step, and the run the
  checkpoint belongs to (``run``: see :mod:`mm.training.identity`).

Everything mm writes is safetensors or JSON: no pickle. A folder is written under a temporary name
and renamed when complete, so a kill mid-write leaves the previous checkpoint intact; only the last
``keep_last`` are kept. A kill skips that clean-up: :func:`remove_leftovers` removes what it left when
the stage runs again. A write the disk refuses (full, read-only) raises :class:`WriteError` naming the
file; the checkpoints written before it are untouched.

Under FSDP2 the weights and AdamW moments are sharded DTensors. :func:`full_tensors` and
:func:`full_optimizer_state` gather them whole (collectives: every rank calls them, in the same order)
so that one rank writes the very format a single process writes; :func:`shard_like` and
:func:`load_optimizer_state` cut whole tensors read from a checkpoint back into each rank's shards.
A checkpoint therefore resumes on any number of processes, sharded or not.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mm._io import atomic_dir, remove_atomic_leftovers

__all__ = [
    "STAGE_OUTPUTS",
    "WriteError",
    "checkpoint_run",
    "discard_stage_outputs",
    "full_optimizer_state",
    "full_tensors",
    "latest_checkpoint",
    "list_checkpoints",
    "load_optimizer_state",
    "load_train_state",
    "prune_checkpoints",
    "remove_leftovers",
    "save_train_state",
    "shard_like",
    "writing",
]

_STEP = re.compile(r"^step-(\d{8})$")

#: What a stage writes into its folder (``--replace`` removes exactly these).
STAGE_OUTPUTS = ("checkpoints", "model", "tensorboard", "metrics.jsonl", "summary.json", "loss.png")
#: Of those, what is written atomically (a kill may leave ``.NAME.tmp-*`` of it).
_ATOMIC_OUTPUTS = ("model", "summary.json")


class WriteError(RuntimeError):
    """The disk refused a checkpoint, the model or a stage file (full, read-only, quota)."""


@contextlib.contextmanager
def writing(target: str | Path, checkpoints: str | Path) -> Iterator[None]:
    """Turn the disk refusing a write into :class:`WriteError` naming ``target`` and saying which
    checkpoint in ``checkpoints`` is intact (writes are atomic: a failed one leaves nothing)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        latest = latest_checkpoint(checkpoints)
        kept = (
            f"the checkpoints written before it are intact (latest: {latest}); free space and run again "
            "with --resume"
            if latest is not None
            else "no checkpoint had been written yet"
        )
        raise WriteError(f"could not write {target}: {reason}; {kept}") from None


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
    run: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/step-NNNNNNNN`` atomically and return its path.

    ``optimizer`` is the optimizer itself or a state dict of whole tensors in its layout (what
    :func:`full_optimizer_state` gathers from a sharded one). ``run`` names the run the checkpoint
    belongs to (:meth:`mm.training.identity.RunIdentity.to_dict`).
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
        "run": run,
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


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first."""
    return [p for _, p in _checkpoints(Path(folder))]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (temporary folders of a killed write are ignored)."""
    found = _checkpoints(Path(folder))
    return found[-1][1] if found else None


def checkpoint_run(path: str | Path) -> dict[str, Any] | None:
    """The run a checkpoint names in its ``state.json`` (None for one written before checkpoints did)."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    run = state.get("run") if isinstance(state, dict) else None
    return run if isinstance(run, dict) else None


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary folders)."""
    folder = Path(folder)
    found = _checkpoints(folder)
    for _, p in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    remove_atomic_leftovers(folder, lambda name: _STEP.match(name) is not None)


def remove_leftovers(stage_folder: str | Path) -> list[Path]:
    """Remove the temporary entries killed atomic writes left in a stage's folder and its
    ``checkpoints/`` (``.model.tmp-*``, ``.summary.json.tmp-*``, ``.step-NNNNNNNN.tmp-*``); nothing else."""
    folder = Path(stage_folder)
    return [
        *remove_atomic_leftovers(folder, _ATOMIC_OUTPUTS),
        *remove_atomic_leftovers(folder / "checkpoints", lambda name: _STEP.match(name) is not None),
    ]


def discard_stage_outputs(stage_folder: str | Path) -> None:
    """Remove everything a stage wrote into its folder (:data:`STAGE_OUTPUTS`, and leftovers of killed
    writes), so that a new run starts from nothing; other files in the folder stay."""
    folder = Path(stage_folder)
    remove_leftovers(folder)
    for name in STAGE_OUTPUTS:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
