"""mm's own model folder: adapters and encoders, plus a reference to the frozen backbone.

Layout of a saved folder::

    config.json           {"model_type": "mm", "config": {...}, "backbone": {"path", "format", "digest"}, ...}
    adapters.safetensors  every weight that is not the backbone's; its metadata records the config
                          the weights were written with ({"format": "pt", "mm_config": <JSON>})
    backbone/             (only with copy_backbone) the backbone in Hugging Face layout

A trained adapter is therefore megabytes, not the model. On load, the backbone is read from its
path and its digest must equal the recorded one: an adapter never silently runs on a different
text model.

Loading refuses, with one line naming the value that disagrees and what it disagrees with
(:class:`~mm.text_backbone.checkpoint.CheckpointError`), a folder whose parts do not agree:

* ``config.json``'s values (types and ranges, checked by the configs themselves);
* ``config.json``'s model config and the one recorded in ``adapters.safetensors``: a change that
  keeps every shape (where the blocks sit, eps, feature layers) would otherwise load and answer
  differently;
* ``config.text`` and the referenced backbone's own configuration, field by field;
* the weights' names, shapes and dtypes: without ``dtype=``, every weight must be stored in the
  backbone's dtype (a model never loads to fail later in a matrix product); with ``dtype=``, every
  weight is cast to it;
* the tokenizer file and the preprocessing and generation settings, and how they fit the model
  (vocabulary, tile size, audio frame rates, stop ids).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import mm
from mm._io import atomic_dir
from mm._values import ConfigValueError
from mm.model.components import component_of
from mm.model.config import ModelConfig
from mm.text_backbone import TextBackbone
from mm.text_backbone.checkpoint import CheckpointError, collect_strict, iter_safetensors, read_json

__all__ = ["ADAPTERS_FILE", "CONFIG_METADATA_KEY", "load_backbone_ref", "load_multimodal", "save_multimodal"]

ADAPTERS_FILE = "adapters.safetensors"
#: Key of the safetensors metadata of ``adapters.safetensors`` that holds the model config (JSON).
CONFIG_METADATA_KEY = "mm_config"
_BACKBONE_FORMATS = ("hf", "meta", "mllama", "meta_vision")


def canonical_config_json(config: ModelConfig) -> str:
    """The model config as compact JSON with sorted keys: what ``adapters.safetensors`` records."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def save_multimodal(model, path: str | os.PathLike, *, copy_backbone: bool = False, **extra: Any) -> None:
    """Write mm's folder (see the module docstring); the weights record the config they belong to."""
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
            metadata={"format": "pt", CONFIG_METADATA_KEY: canonical_config_json(model.config)},
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
    if fmt not in _BACKBONE_FORMATS or not isinstance(digest, str):
        raise CheckpointError(
            f"{folder}/config.json has a malformed 'backbone' entry: format must be one of "
            f"{list(_BACKBONE_FORMATS)} and digest a string, got {ref!r}"
        )
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
    """Read mm's folder, a Hugging Face Mllama folder or Meta's layout (told apart by their files).

    An mm folder loads only when its parts agree (see the module docstring); otherwise a
    :class:`~mm.text_backbone.checkpoint.CheckpointError` says which value disagrees with what.

    ``dtype=None`` keeps the stored dtype, which must be the backbone's for every weight; a
    ``dtype`` casts the backbone and every other weight to it.

    Folders written before ``adapters.safetensors`` recorded its config (no ``mm_config`` in its
    metadata) still load: names, shapes, dtypes, values, the backbone and the settings are checked
    as above, but settings that keep every shape (where the blocks sit, eps, feature layers) cannot
    be checked against the weights, and a ``UserWarning`` says so. Saving the model again records it.
    """
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
    where = f"{path}/config.json"
    if "config" not in meta:
        raise CheckpointError(f"{where} has no 'config' entry")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    adapters = path / ADAPTERS_FILE
    _check_recorded_config(config, adapters, where)
    backbone = load_backbone_ref(path, meta.get("backbone"), dtype=dtype)
    _check_backbone_config(config, backbone, where)
    with torch.device("meta"):
        model = cls(config, backbone=TextBackbone(config.text))
    model.backbone = backbone.freeze()
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if component_of(k) != "backbone"}
    loaded = collect_strict(
        expected,
        iter_safetensors([adapters]),
        dtype=dtype,
        device=backbone.device,
        source=path,
        one_dtype=backbone.dtype,
        one_dtype_of="the backbone",
    )
    model.load_state_dict(loaded, strict=False, assign=True)
    if meta.get("preprocessing") is not None:
        model.preprocessor = _load_preprocessor(path, meta["preprocessing"], config)
    if meta.get("generation") is not None:
        model.generation_defaults = _load_generation(meta["generation"], config, where)
    model.saved_meta = meta
    return model


# ---------------------------------------------------------------------------------------- agreement
def _differences(ours: Any, theirs: Any, key: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, ours, theirs)`` for every leaf where two config dictionaries differ, in order."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for k in [*ours, *(k for k in theirs if k not in ours)]:
            yield from _differences(ours.get(k), theirs.get(k), f"{key}.{k}" if key else str(k))
    elif ours != theirs:
        yield key, ours, theirs


def _show(value: Any) -> str:
    return json.dumps(value)


def _disagreement(where: str, diffs: list[tuple[str, Any, Any]], other: str) -> str:
    """``<where> says k v, but <other> w; …`` for at most three differences, on one line."""
    parts = [f"{k} {_show(a)}, but {other} {_show(b)}" for k, a, b in diffs[:3]]
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return f"{where} says " + "; ".join(parts) + more


def _check_recorded_config(config: ModelConfig, adapters: Path, where: str) -> None:
    """``config.json``'s model config must be the one ``adapters.safetensors`` was written with."""
    try:
        with safe_open(adapters, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {adapters}: {e}") from None
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        warnings.warn(
            f"{adapters} records no {CONFIG_METADATA_KEY} (saved before mm recorded the config beside the "
            "weights): where the blocks sit, eps and other settings of config.json that keep every "
            "shape cannot be checked against the weights; save the model again to record them",
            UserWarning,
            stacklevel=4,
        )
        return
    try:
        recorded = ModelConfig.from_dict(json.loads(text))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{adapters} records an unreadable {CONFIG_METADATA_KEY}: {e}") from None
    diffs = list(_differences(config.to_dict(), recorded.to_dict()))
    if diffs:
        raise CheckpointError(_disagreement(where, diffs, f"{ADAPTERS_FILE} was written for"))


def _check_backbone_config(config: ModelConfig, backbone: TextBackbone, where: str) -> None:
    """``config.text`` must be the backbone's own configuration, every field of it."""
    diffs = list(_differences(config.text.to_dict(), backbone.config.to_dict(), "text"))
    if diffs:
        at = (backbone.source or {}).get("path", "its path")
        raise CheckpointError(_disagreement(where, diffs, f"the backbone at {at} has"))


def _load_preprocessor(path: Path, settings: Any, config: ModelConfig):
    """The saved preprocessor: its settings well formed, its tokenizer readable and fitting the model."""
    from mm.datasets.preprocessing import Preprocessor
    from mm.text_backbone.tokenizer import tokenizer_file

    where = f"{path}/config.json"
    try:
        pre = Preprocessor.load(path, settings)
    except ConfigValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the tokenizer saved in {path}: {e}") from None
    vocab = config.text.vocab_size
    if pre.tokenizer.vocab_size != vocab:
        raise CheckpointError(
            f"the tokenizer {tokenizer_file(path)} has {pre.tokenizer.vocab_size} tokens, but {where} says "
            f"text.vocab_size {vocab}"
        )
    enc = config.image_encoder
    image = pre.image_processor
    if image is not None and hasattr(enc, "image_size") and image.tile_size != enc.image_size:
        raise CheckpointError(
            f"{where} says preprocessing.image.tile_size {image.tile_size}, but the image encoder takes "
            f"image_encoder.image_size {enc.image_size}"
        )
    if pre.encoder_tiles is not None and hasattr(enc, "max_num_tiles"):
        wanted = (enc.max_num_tiles, enc.supported_aspect_ratios)
        if pre.encoder_tiles != wanted:
            raise CheckpointError(
                f"{where} says preprocessing.encoder_tiles {_show([pre.encoder_tiles[0], pre.encoder_tiles[1]])}, "
                f"but the image encoder has {_show([wanted[0], wanted[1]])}"
            )
    speech = config.speech
    if pre.audio_tokens is not None and speech is not None:
        pairs = (
            ("stack", "speech.encoder.stack", speech.encoder.stack),
            ("conv_kernel", "speech.adapter.conv_kernel", speech.adapter.conv_kernel),
            ("conv_stride", "speech.adapter.conv_stride", speech.adapter.conv_stride),
        )
        for key, theirs, value in pairs:
            if getattr(pre.audio_tokens, key) != value:
                raise CheckpointError(
                    f"{where} says preprocessing.audio_tokens.{key} {getattr(pre.audio_tokens, key)}, but "
                    f"the speech model has {theirs} {value}"
                )
        if pre.audio.n_mels != speech.encoder.input_dim:
            raise CheckpointError(
                f"{where} says preprocessing.audio.n_mels {pre.audio.n_mels}, but the speech encoder takes "
                f"speech.encoder.input_dim {speech.encoder.input_dim}"
            )
    return pre


def _load_generation(settings: Any, config: ModelConfig, where: str):
    from mm.model.generation import GenerationDefaults

    try:
        defaults = GenerationDefaults.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} 'generation': {e}") from None
    vocab = config.text.vocab_size
    outside = [i for i in defaults.stop_token_ids or () if i >= vocab]
    if outside:
        raise CheckpointError(
            f"{where}: generation.stop_token_ids: {outside[0]} is not a token of this model "
            f"(text.vocab_size {vocab})"
        )
    return defaults
