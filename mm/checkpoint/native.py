"""mm's own model folder: adapters and encoders, plus a reference to the frozen backbone.

Layout of a saved folder::

    config.json           {"model_type": "mm", "config": {...}, "backbone": {"path", "format", "digest"}, ...}
    adapters.safetensors  every weight that is not the backbone's
    backbone/             (only with copy_backbone) the backbone in Hugging Face layout

A trained adapter is therefore megabytes, not the model. On load, the backbone is read from its
path and its digest must equal the recorded one: an adapter never silently runs on a different
text model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import mm
from mm._io import atomic_dir
from mm.model.components import component_of
from mm.model.config import ModelConfig
from mm.text_backbone import TextBackbone
from mm.text_backbone.checkpoint import CheckpointError, collect_strict, iter_safetensors, read_json

__all__ = ["load_backbone_ref", "load_multimodal", "save_multimodal"]

ADAPTERS_FILE = "adapters.safetensors"


def save_multimodal(model, path: str | os.PathLike, *, copy_backbone: bool = False, **extra: Any) -> None:
    path = Path(path)
    digest = model.backbone.digest()
    preprocessor = getattr(model, "preprocessor", None)
    with atomic_dir(path) as tmp:
        if preprocessor is not None:
            extra = {"preprocessing": preprocessor.save(tmp), **extra}
        if getattr(model, "generation_defaults", None) is not None:
            extra = {"generation": model.generation_defaults.to_dict(), **extra}
        if copy_backbone:
            model.backbone.save_pretrained(tmp / "backbone")
            ref = {"path": "backbone", "format": "hf", "digest": digest}
        else:
            source = model.backbone.source
            if source is None:
                raise ValueError(
                    "the backbone was not read from disk, so it cannot be referred to: "
                    "save with copy_backbone=True (or save the backbone first and load it from there)"
                )
            ref = {**source, "digest": digest}
        save_file(
            {k: v.detach().contiguous() for k, v in model.adapter_state_dict().items()},
            tmp / ADAPTERS_FILE,
            metadata={"format": "pt"},
        )
        meta = {
            "model_type": "mm",
            "mm_version": mm.__version__,
            "config": model.config.to_dict(),
            "backbone": ref,
            **extra,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_backbone_ref(folder: Path, ref: dict, *, dtype: torch.dtype | None) -> TextBackbone:
    """Read the backbone a saved folder refers to and check its digest."""
    try:
        where = Path(ref["path"])
        fmt = ref["format"]
        digest = ref["digest"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{folder}/config.json has a malformed 'backbone' entry: {ref!r}") from None
    if not where.is_absolute():
        where = folder / where
    if fmt == "mllama":
        from mm.checkpoint.mllama import load_mllama_backbone

        backbone = load_mllama_backbone(where, dtype=None)
    elif fmt == "meta_vision":
        from mm.checkpoint.meta import load_meta_backbone

        backbone = load_meta_backbone(where, dtype=None)
    else:
        backbone = TextBackbone.from_pretrained(where)
    found = backbone.digest()
    if found != digest:
        raise CheckpointError(
            f"the backbone at {where} has digest {found[:16]}…, but this model was saved with "
            f"{digest[:16]}…: these adapters belong to a different text model"
        )
    if dtype is not None:
        backbone.to(dtype)
    return backbone


def load_multimodal(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None):
    path = Path(path)
    if not (path / "config.json").is_file():
        if (path / "params.json").is_file():
            from mm.checkpoint.meta import is_meta_vision_folder, load_meta

            if not is_meta_vision_folder(path):
                raise CheckpointError(
                    f"{path} holds Meta's layout of a text-only model (params.json has no vision_chunk_size): "
                    "use MultimodalModel.from_backbone(path, preset) to attach fresh adapters"
                )
            return load_meta(cls, path, dtype=dtype)
        raise CheckpointError(f"{path} has neither config.json (mm, Hugging Face) nor params.json (Meta)")
    meta = read_json(path / "config.json")
    model_type = meta.get("model_type")
    if model_type == "mllama":
        from mm.checkpoint.mllama import load_mllama

        return load_mllama(cls, path, dtype=dtype)
    if model_type != "mm":
        raise CheckpointError(
            f"{path}/config.json has model_type {model_type!r}; expected 'mm' (a saved mm model) or 'mllama' "
            "(for a text-only Llama checkpoint use MultimodalModel.from_backbone)"
        )
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    backbone = load_backbone_ref(path, meta.get("backbone"), dtype=dtype)
    with torch.device("meta"):
        model = cls(config, backbone=TextBackbone(config.text))
    model.backbone = backbone.freeze()
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if component_of(k) != "backbone"}
    loaded = collect_strict(
        expected, iter_safetensors([path / ADAPTERS_FILE]), dtype=dtype, device=backbone.device, source=path
    )
    model.load_state_dict(loaded, strict=False, assign=True)
    if meta.get("preprocessing") is not None:
        from mm.datasets.preprocessing import Preprocessor

        model.preprocessor = Preprocessor.load(path, meta["preprocessing"])
    if meta.get("generation") is not None:
        from mm.model.generation import GenerationDefaults

        try:
            model.generation_defaults = GenerationDefaults.from_dict(meta["generation"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/config.json 'generation': {e}") from None
    model.saved_meta = meta
    return model
