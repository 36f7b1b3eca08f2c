"""Reading and writing text backbone checkpoints.

Two source layouts, told apart by their config file (never guessed from tensor names):

* Hugging Face: ``config.json`` (``model_type: llama``) + one or many ``*.safetensors``, with
  ``model.safetensors.index.json`` when sharded.
* Meta (llama-models): ``params.json`` + ``consolidated.NN.pth`` model-parallel shards, read with
  ``torch.load(weights_only=True, mmap=True)`` so nothing but tensors is ever unpickled.

Loading is strict: a tensor that is missing, unexpected or mis-shaped raises :class:`CheckpointError`
naming the tensor and the file. The model is built on the meta device and the tensors are assigned,
so an 8B model loads in the memory of one copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mm._io import atomic_dir
from mm.text_backbone.config import TextConfig
from mm.text_backbone.key_maps import (
    hf_to_mm,
    meta_shard_dim,
    meta_to_mm,
    mm_to_hf,
    mm_to_meta,
    permute_from_meta,
    permute_to_meta,
)

__all__ = [
    "CheckpointError",
    "merge_meta_shards",
    "meta_checkpoint_files",
    "read_meta_shards",
    "split_meta_shards",
    "write_meta_shards",
    "detect_layout",
    "iter_safetensors",
    "load_backbone",
    "read_json",
    "save_backbone",
    "assign_strict",
    "collect_strict",
]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as declared."""


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def detect_layout(path: Path) -> str:
    """``"hf"``, ``"meta"``; from the config file the folder holds."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    raise CheckpointError(f"{path} holds neither config.json (Hugging Face) nor params.json (Meta)")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are not there: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has config.json but no *.safetensors files")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """``(name, tensor, file)`` for every tensor of ``files``; unreadable files raise CheckpointError."""
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name), file
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from None


def meta_checkpoint_files(path: Path) -> list[Path]:
    """Meta's weight files in a folder: ``consolidated.pth`` or ``consolidated.NN.pth`` shards in order."""
    files = sorted(path.glob("consolidated.*.pth"))
    single = path / "consolidated.pth"
    if single.is_file():
        if files:
            raise CheckpointError(f"{path} holds both consolidated.pth and consolidated.NN.pth files")
        files = [single]
    if not files:
        raise CheckpointError(f"{path} has params.json but no consolidated.*.pth files")
    return files


def read_meta_shards(path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """The model-parallel shards of a Meta folder, each a dictionary of tensors (memory-mapped).

    ``torch.load(weights_only=True, mmap=True)``: nothing but tensors is ever unpickled. Every shard
    must hold the same tensor names.
    """
    files = meta_checkpoint_files(path)
    shards = []
    for file in files:
        try:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for a damaged or hostile file
            raise CheckpointError(f"cannot read {file} as a tensor-only checkpoint: {e}") from None
        if not isinstance(shard, dict) or not all(torch.is_tensor(v) for v in shard.values()):
            raise CheckpointError(f"{file} does not hold a dictionary of tensors")
        shards.append(shard)
    names = list(shards[0])
    for file, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))[:5]
            raise CheckpointError(f"{file} holds different tensor names from {files[0]}: {diff}")
    return files, shards


def merge_meta_shards(
    files: list[Path], shards: list[dict[str, torch.Tensor]], shard_dim: Callable[[str], int | None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` for every tensor, model-parallel parts joined along ``shard_dim(name)``.

    ``shard_dim`` raises ``KeyError`` for a name it does not know (reported as an unexpected tensor)
    and returns ``None`` for tensors every shard holds whole.
    """
    for name in shards[0]:
        try:
            dim = shard_dim(name)
        except KeyError:
            raise CheckpointError(f"unexpected tensor {name!r} in {files[0]}") from None
        parts = [shard[name] for shard in shards]
        yield name, parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def split_meta_shards(
    state: Mapping[str, torch.Tensor], num_shards: int, shard_dim: Callable[[str], int | None]
) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`merge_meta_shards`: ``num_shards`` model-parallel shards of ``state``."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name, t in state.items():
        dim = shard_dim(name)
        if dim is not None and t.shape[dim] % num_shards:
            raise ValueError(f"{name} {tuple(t.shape)} does not split into {num_shards} equal parts")
        for i in range(num_shards):
            shards[i][name] = t.clone() if dim is None else t.chunk(num_shards, dim=dim)[i].clone()
    return shards


def write_meta_shards(folder: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    """``consolidated.NN.pth`` files (``torch.save``: tensors only)."""
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


def _iter_meta(path: Path, config: TextConfig) -> Iterator[tuple[str, torch.Tensor, Path]]:
    files, shards = read_meta_shards(path)
    for name, t in merge_meta_shards(files, shards, meta_shard_dim):
        mm_name = meta_to_mm(name)
        if mm_name.endswith("q_proj.weight"):
            t = permute_from_meta(t, config.num_heads)
        elif mm_name.endswith("k_proj.weight"):
            t = permute_from_meta(t, config.num_kv_heads)
        yield mm_name, t, files[0]


def collect_strict(
    expected: Mapping[str, torch.Tensor],
    tensors: Iterable[tuple[str, torch.Tensor, Path]],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
    source: Path,
    allowed_extra: Callable[[str], bool] = lambda name: False,
    one_dtype: torch.dtype | bool = False,
    one_dtype_of: str | None = None,
) -> dict[str, torch.Tensor]:
    """Gather ``(name, tensor, file)`` items for the names of ``expected``, strictly.

    Every expected name must come exactly once with the expected shape; any other name is an
    error unless ``allowed_extra(name)``. Errors name the tensor and the file.

    Args:
        dtype: cast every tensor to it; ``None`` keeps what is stored.
        one_dtype: with ``dtype=None``, refuse a tensor whose stored dtype is not this one
            (``True``: the first tensor's), so that a model never loads with weights of several
            dtypes and fails later inside a matrix product.
        one_dtype_of: what ``one_dtype`` is the dtype of, for the message (``"the backbone"``).
    """
    loaded: dict[str, torch.Tensor] = {}
    reference: tuple[str, torch.dtype] | None = None
    if dtype is None and isinstance(one_dtype, torch.dtype):
        reference = (one_dtype_of or "the rest of the model", one_dtype)
    for name, t, file in tensors:
        if name not in expected:
            if allowed_extra(name):
                continue
            raise CheckpointError(f"unexpected tensor {name!r} in {file}")
        if name in loaded:
            raise CheckpointError(f"tensor {name!r} appears twice (again in {file})")
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"tensor {name!r} in {file} has shape {tuple(t.shape)}; the config needs {want}"
            )
        if not t.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r} in {file} has dtype {t.dtype}; weights must be floating point"
            )
        if dtype is None and one_dtype is not False:
            if reference is None:
                reference = (f"tensor {name!r}", t.dtype)
            elif t.dtype != reference[1]:
                raise CheckpointError(
                    f"tensor {name!r} in {file} is {_dtype_name(t.dtype)}, but {reference[0]} is "
                    f"{_dtype_name(reference[1])}: a model loads in one dtype "
                    "(pass dtype= to from_pretrained to cast every weight to it)"
                )
        loaded[name] = t.to(device=device, dtype=dtype or t.dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source} is missing tensors {missing[:5]}{more}")
    return loaded


def assign_strict(
    model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor, Path]], **kwargs
) -> None:
    """Assign tensors into ``model`` (built on the meta device): all of its weights, strictly."""
    loaded = collect_strict(model.state_dict(keep_vars=True), tensors, **kwargs)
    model.load_state_dict(loaded, strict=True, assign=True)


def load_backbone(cls, path: str | os.PathLike, *, dtype: torch.dtype | None, device: torch.device | str):
    path = Path(path)
    layout = detect_layout(path)
    if layout == "hf":
        hf = read_json(path / "config.json")
        model_type = hf.get("model_type")
        if model_type != "llama":
            hint = (
                " (use mm.MultimodalModel.from_pretrained for Llama 3.2 Vision)"
                if model_type == "mllama"
                else ""
            )
            raise CheckpointError(f"{path}/config.json has model_type {model_type!r}, not 'llama'{hint}")
        try:
            config = TextConfig.from_hf(hf)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/config.json: {e}") from None

        def tensors():
            for name, t, file in iter_safetensors(_safetensors_files(path)):
                try:
                    mm_name = hf_to_mm(name)
                except KeyError:
                    raise CheckpointError(f"unexpected tensor {name!r} in {file}") from None
                if mm_name is not None:
                    yield mm_name, t, file

        # A tied model's file may still carry a copy of the head; the tied embedding is what is used.
        allowed = (lambda n: n == "lm_head.weight") if config.tie_embeddings else (lambda n: False)
    else:
        params = read_json(path / "params.json")
        try:
            config = TextConfig.from_meta(params, vocab_size=_meta_vocab(path, params))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/params.json: {e}") from None

        def tensors():
            yield from _iter_meta(path, config)

        allowed = lambda n: False  # noqa: E731
    with torch.device("meta"):
        model = cls(config)
    assign_strict(
        model, tensors(), dtype=dtype, device=device, source=path, allowed_extra=allowed, one_dtype=True
    )
    model.source = {"path": str(path.resolve()), "format": layout}
    return model


def _meta_vocab(path: Path, params: dict) -> int | None:
    if int(params.get("vocab_size", -1)) > 0:
        return None
    # Older params.json files give -1: the vocabulary is the embedding's row count (Llama 3 splits
    # the embedding along the vocabulary across model-parallel shards).
    files, shards = read_meta_shards(path)
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]} has no tok_embeddings.weight")
    return sum(int(shard["tok_embeddings.weight"].shape[0]) for shard in shards)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_backbone(model, path: str | os.PathLike, *, layout: str, max_shard_bytes: int) -> None:
    """Write ``model`` to ``path`` in the Hugging Face (``"hf"``) or Meta (``"meta"``) layout, atomically."""
    config: TextConfig = model.config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        if layout == "hf":
            (tmp / "config.json").write_text(
                json.dumps(config.to_hf(_dtype_name(model.dtype)), indent=2) + "\n"
            )
            shards: list[dict[str, torch.Tensor]] = [{}]
            size = 0
            for name, t in state.items():
                nbytes = t.numel() * t.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][mm_to_hf(name)] = t
                size += nbytes
            if len(shards) == 1:
                save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, tmp / fname, metadata={"format": "pt"})
                    weight_map.update({k: fname for k in shard})
                total = sum(t.numel() * t.element_size() for t in state.values())
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        elif layout == "meta":
            (tmp / "params.json").write_text(json.dumps(config.to_meta(), indent=2) + "\n")
            if config.tie_embeddings:
                state["lm_head.weight"] = state["embed_tokens.weight"]
            out = {}
            for name, t in state.items():
                if name.endswith("q_proj.weight"):
                    t = permute_to_meta(t, config.num_heads)
                elif name.endswith("k_proj.weight"):
                    t = permute_to_meta(t, config.num_kv_heads)
                out[mm_to_meta(name)] = t.clone()
            write_meta_shards(tmp, [out])
        else:
            raise ValueError(f"unknown layout {layout!r}; use 'hf' or 'meta'")
