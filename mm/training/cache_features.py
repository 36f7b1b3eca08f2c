"""``mm data cache-features``: run the frozen image encoder once over video shards (Llama 3, 7.4).

In the video stage only the temporal aggregator and the video cross-attention blocks learn
("The Llama 3 Herd of Models", sections 7.2 and 7.4); the image encoder and its projector are
frozen, so every epoch would compute the same frame tokens again. :func:`cache_features` computes
them once and writes new shards in which each video member ``FIELD`` (``0.mp4``) is replaced by a
*features member* ``FIELD.safetensors`` (``0.mp4.safetensors``) holding that video's frame tokens
``[f, t, p, d]`` — the output of the image encoder and projector for each sampled frame, in the
dtype the projector produces (the model's dtype: float32 for a float32 model, so the cached path
gives the loss of the pixel path) unless ``dtype`` asks for another. The json's video part names
the features member; images, audio and text stay as they were (media members that no message
uses are left out, as training never reads them).

Output layout: one output shard per input shard, with the same file name and the same samples in
the same order (a sample whose video cannot be decoded is left out and counted, as training skips
it), so a stage reads the cached shards in exactly the order it reads the source shards. Shards are
written into a hidden folder inside ``out`` and moved into place only when all are complete;
``manifest.json`` is written last and records the source, the model's backbone digest, the digest
of the image encoder and projector weights, and the frame settings.

Staleness. Every features member carries a *fingerprint* in its safetensors header: the digest of
the image encoder + projector weights, the frames sampled per clip and the image settings (tile
size, tiles, normalisation, the encoder's tile padding). The trainer gives its preprocessor the
fingerprint of the model a stage starts from (:func:`features_fingerprint`), and reading a features
member whose fingerprint differs stops the stage with :class:`StaleFeaturesError` naming what
differs — features made by another encoder or projector, or with other frame settings, are never
silently trained on. The backbone's digest is recorded but not checked: frame tokens do not depend
on the backbone (a hot-swapped instruct backbone can reuse them).

Shapes: N videos in an encoder batch, f frames, t tiles, p tokens per tile, d model width.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from mm.datasets.shards import (
    SampleError,
    add_member,
    check_messages,
    discard_shards,
    is_features,
    publish_shards,
    rewrite_media,
)
from mm.datasets.webdata import DataCounters, DataError, expand_shards, normalize_sample, read_shard

if (
    TYPE_CHECKING
):  # mm.datasets.preprocessing pulls in torchvision; `mm --help` registers this module's parser
    from mm.datasets.preprocessing import Preprocessor

__all__ = [
    "FEATURES_FORMAT",
    "CacheResult",
    "StaleFeaturesError",
    "cache_features",
    "check_fingerprint",
    "encoder_digest",
    "features_fingerprint",
    "features_preprocessor",
    "read_features",
    "run_cache_features",
    "write_features",
]

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "mm-frame-features/1"
_HEADER_KEY = "mm_frame_features"  # safetensors metadata entry holding the fingerprint (JSON)
_TENSOR_NAME = "frames"
_MAX_HEADER_BYTES = 1 << 20
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StaleFeaturesError(DataError):
    """Cached frame features that do not belong to this model or these frame settings."""


@dataclass(frozen=True)
class CacheResult:
    """What :func:`cache_features` wrote.

    Attributes:
        out_dir: folder of the new shards and ``manifest.json``.
        shards: shard file names, one per source shard (same names).
        samples: samples written.
        videos: videos encoded (each written as a features member).
        skipped: reason -> samples left out (undecodable video, bad json ...).
        seconds: wall time.
        fingerprint: what the features were made with (see :func:`features_fingerprint`).
    """

    out_dir: Path
    shards: tuple[str, ...]
    samples: int
    videos: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    fingerprint: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- fingerprints


def encoder_digest(model) -> str:
    """SHA-256 of the image encoder and projector weights (names, dtypes, shapes, bytes)."""
    from mm.text_backbone.digest import state_digest

    if model.image_encoder is None or model.projector is None:
        raise ValueError("this model has no image encoder: there are no frame features to cache")
    weights = {f"image_encoder.{k}": v for k, v in model.image_encoder.state_dict().items()}
    weights.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    return state_digest(weights)


def features_fingerprint(model, preprocessor: Preprocessor) -> dict[str, Any]:
    """What frame tokens of ``model`` under ``preprocessor``'s video and image settings depend on.

    Two fingerprints are equal exactly when the same clip gives the same frame tokens: the image
    encoder + projector weights, the frames sampled per clip, and how a frame becomes a tile
    (tile size, tiles, normalisation, resampling, padding to the encoder's tiles). Size caps are
    left out: they decide whether a clip is accepted, not what its tokens are.
    """
    if preprocessor.video is None or preprocessor.image_processor is None:
        raise ValueError("the preprocessor takes no video")
    image = preprocessor.image_processor.to_dict()
    image.pop("max_image_pixels", None)
    return {
        "format": FEATURES_FORMAT,
        "encoder_digest": encoder_digest(model),
        "num_frames": preprocessor.video.num_frames,
        "image": image,
        "encoder_tiles": preprocessor.settings()["encoder_tiles"],
    }


def check_fingerprint(
    found: Mapping[str, Any] | None, expected: Mapping[str, Any] | None, where: str
) -> None:
    """Refuse cached features whose fingerprint is not ``expected``, naming what differs.

    Raises:
        StaleFeaturesError: ``expected`` is None (nothing to check against), or a field differs.
    """
    redo = "re-run `mm data cache-features` with the model and frame settings of this stage"
    if expected is None:
        raise StaleFeaturesError(
            f"{where}: cached video features can be used only where the model's encoder fingerprint "
            "is known (the trainer sets Preprocessor.video_features_fingerprint from the model, "
            "except in stages that train the image encoder or projector, which make them stale); "
            "refusing features that cannot be checked"
        )
    found = found or {}
    if found.get("format") != expected["format"]:
        raise StaleFeaturesError(
            f"{where}: features member of format {found.get('format')!r}, expected {expected['format']!r}; {redo}"
        )
    problems = []
    if found.get("encoder_digest") != expected["encoder_digest"]:
        problems.append(
            f"they were made by another image encoder / projector (weights digest "
            f"{str(found.get('encoder_digest'))[:16]}…, this model's is {expected['encoder_digest'][:16]}…)"
        )
    if found.get("num_frames") != expected["num_frames"]:
        problems.append(
            f"they sample {found.get('num_frames')} frames per clip, this stage samples "
            f"{expected['num_frames']} (--num-frames)"
        )
    image, want = found.get("image") or {}, expected["image"]
    diff = [
        f"{k}: {image.get(k)!r} vs {want.get(k)!r}"
        for k in sorted(set(image) | set(want))
        if image.get(k) != want.get(k)
    ]
    if diff:
        problems.append(f"their frames were prepared with other image settings ({'; '.join(diff)})")
    if found.get("encoder_tiles") != expected["encoder_tiles"]:
        problems.append(
            f"their frames were padded to other encoder tiles ({found.get('encoder_tiles')} vs "
            f"{expected['encoder_tiles']})"
        )
    if problems:
        raise StaleFeaturesError(f"{where}: stale cached video features: {'; '.join(problems)}; {redo}")


# --------------------------------------------------------------------------- the features member


def write_features(tokens: torch.Tensor, fingerprint: Mapping[str, Any]) -> bytes:
    """A features member: ``tokens [f, t, p, d]`` and the fingerprint, as safetensors bytes."""
    if tokens.ndim != 4:
        raise ValueError(f"frame tokens must be [f, t, p, d], got {tuple(tokens.shape)}")
    metadata = {_HEADER_KEY: json.dumps(dict(fingerprint), sort_keys=True)}
    return save_safetensors({_TENSOR_NAME: tokens.detach().cpu().contiguous()}, metadata=metadata)


def read_features(data: bytes) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Frame tokens ``[f, t, p, d]`` and fingerprint (None when absent) of a features member.

    Raises:
        ValueError: the bytes are not a safetensors file holding one ``[f, t, p, d]`` float tensor.
    """
    if len(data) < 8:
        raise ValueError("features member is too short to be safetensors")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ValueError("features member has a corrupt safetensors header")
    try:
        header = json.loads(data[8 : 8 + size])
        tensors = load_safetensors(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"features member is not readable safetensors: {exc}") from exc
    tokens = tensors.get(_TENSOR_NAME)
    if set(tensors) != {_TENSOR_NAME} or tokens.ndim != 4 or not tokens.is_floating_point():
        raise ValueError(f"features member must hold one float tensor {_TENSOR_NAME!r} [f, t, p, d]")
    text = (header.get("__metadata__") or {}).get(_HEADER_KEY)
    try:
        fingerprint = json.loads(text) if text else None
    except json.JSONDecodeError:
        fingerprint = None
    return tokens, fingerprint if isinstance(fingerprint, dict) else None


# --------------------------------------------------------------------------- caching


def features_preprocessor(model, num_frames: int | None = None) -> Preprocessor:
    """The preprocessor a video stage of ``model`` decodes clips with (the trainer's
    :func:`~mm.datasets.preprocessing.stage_preprocessor`): the model's saved settings, with ``num_frames`` frames
    per clip when given (else the saved number, or 16), tiles padded to the image encoder's when
    its tile count differs.
    """
    from mm.datasets.preprocessing import stage_preprocessor
    from mm.datasets.video import VideoConfig

    pre = model.preprocessor
    if pre is None or pre.image_processor is None:
        raise ValueError("the model was saved without a tokenizer and image preprocessing settings")
    if model.video_aggregator is None:
        raise ValueError("the model has no video adapter: cached frame features would have no use")
    if num_frames is None:
        num_frames = (pre.video or VideoConfig()).num_frames
    return stage_preprocessor(model, max_seq_len=pre.max_seq_len, num_frames=num_frames)


@dataclass
class _Pending:
    key: str
    messages: list[dict[str, Any]]
    meta: Any
    media: dict[str, bytes]
    videos: list[str]  # fields of the videos, in order of first use
    pixels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # [n, f, t, 3, H, W], [n], [n, t]


class _ShardCacher:
    """Encodes the videos of one shard's samples in batches and writes the samples in order."""

    def __init__(self, model, fingerprint, batch_size: int, dtype: torch.dtype | None, tar) -> None:
        self.model, self.fingerprint, self.batch_size, self.dtype, self.tar = (
            model,
            fingerprint,
            batch_size,
            dtype,
            tar,
        )
        self.pending: list[_Pending] = []
        self.samples = self.videos = 0
        self.frame_shape: tuple[int, ...] | None = None

    def add(self, item: _Pending) -> None:
        self.pending.append(item)
        if sum(len(p.videos) for p in self.pending) >= self.batch_size:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        from mm.model.video import encode_video_frames

        items = [p for p in self.pending if p.videos]
        tokens: list[torch.Tensor] = []
        if items:
            pixels, ids, masks = (torch.cat(parts) for parts in zip(*(p.pixels for p in items)))
            device = self.model.device
            for i in range(0, pixels.shape[0], self.batch_size):
                chunk = slice(i, i + self.batch_size)
                out = encode_video_frames(
                    self.model,
                    pixels[chunk, None].to(device),  # [N, 1, f, t, 3, H, W]: one video per row
                    ids[chunk, None].to(device),
                    masks[chunk, None].to(device),
                )[:, 0]  # [N, f, t, p, d]
                tokens.extend((out if self.dtype is None else out.to(self.dtype)).cpu())
        k = 0
        for p in self.pending:
            mapping = {name: f"{name}.safetensors" for name in p.videos}
            own = dict(zip(p.videos, tokens[k : k + len(p.videos)]))  # field -> [f, t, p, d]
            k += len(p.videos)
            obj: dict[str, Any] = {"messages": rewrite_media(p.messages, mapping) if mapping else p.messages}
            if p.meta:
                obj["meta"] = p.meta
            members = [("json", json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))]
            for name in sorted(_referenced(p.messages)):
                if name in mapping:
                    self.frame_shape = tuple(own[name].shape)
                    members.append((mapping[name], write_features(own[name], self.fingerprint)))
                else:
                    members.append((name, p.media[name]))
            for name, data in members:
                add_member(self.tar, f"{p.key}.{name}", data)
            self.samples += 1
            self.videos += len(p.videos)
        self.pending = []


def _referenced(messages: list[dict[str, Any]]) -> set[str]:
    return {ref for _, ref in check_messages(messages)}


def _video_fields(messages: list[dict[str, Any]]) -> list[str]:
    """Video fields in order of first use."""
    out: list[str] = []
    for kind, ref in check_messages(messages):
        if kind == "video" and ref not in out:
            out.append(ref)
    return out


def _shard_name(url: str) -> str:
    name = re.split(r"[/\\]", url.rstrip("/"))[-1].split("?")[0]
    if not name.endswith(".tar") or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"cannot name the cached shard of {url!r}: its name must be a plain NAME.tar")
    return name


def _source_samples(src: Any) -> int | None:
    """Samples of a packed source folder (its manifest), for the progress bar; None when unknown."""
    try:
        manifest = json.loads((Path(src) / "manifest.json").read_text())
        return int(manifest["samples"])
    except (OSError, TypeError, ValueError, KeyError):
        return None


def cache_features(
    model,
    src: str | os.PathLike | list[str],
    out: str | os.PathLike,
    *,
    num_frames: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> CacheResult:
    """Write shards whose videos are replaced by their frame tokens (see the module docstring).

    Args:
        model: an mm model folder, or a :class:`~mm.MultimodalModel` with its preprocessor.
        src: the video shards (a folder, pattern, URL or list, as :func:`~mm.datasets.expand_shards`).
        out: folder for the new shards and ``manifest.json``.
        num_frames: frames sampled per clip (default: the model's setting, else 16); must be the
            video stage's ``video.num_frames``.
        batch_size: videos encoded at once.
        device: where the encoder runs (default: CUDA when available, else the CPU).
        dtype: storage dtype of the tokens (``"float16"``, ``"bfloat16"``, ``"float32"``); default:
            the projector's output dtype (the model's), which reproduces the pixel path exactly.
        progress: show a progress bar.
        overwrite: replace the shards and manifest of an earlier run in ``out``.

    Returns:
        :class:`CacheResult`.

    Raises:
        FileExistsError: ``out`` holds shards or a manifest and ``overwrite`` is False.
        ValueError: the model has no image encoder / video adapter / preprocessor, the source
            already holds features, or two source shards share a file name.
        DataError: no sample could be written.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dtype = _storage_dtype(dtype)
    model, model_dir = _model_on(model, device)
    preprocessor = features_preprocessor(model, num_frames)
    fingerprint = features_fingerprint(model, preprocessor)
    urls = expand_shards(src)
    names = [_shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(
            f"source shards share file names ({sorted(names)}); cache them into separate folders"
        )
    out = Path(out)
    old, created = _claim_out(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=".mm-cache-", dir=out))
    counters = DataCounters()
    shards: list[dict[str, Any]] = []
    videos, frame_shape = 0, None
    bar = tqdm(
        total=_source_samples(src) if not isinstance(src, list) else None,
        desc="cache-features",
        unit="sample",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for url, name in zip(urls, names):
            cacher = _cache_shard(
                url, tmp / name, model, fingerprint, preprocessor, batch_size, dtype, counters, bar
            )
            shards.append({"name": name, "samples": cacher.samples, "bytes": (tmp / name).stat().st_size})
            videos += cacher.videos
            frame_shape = cacher.frame_shape or frame_shape
        samples = sum(s["samples"] for s in shards)
        if samples == 0:
            raise DataError(f"no sample of {src!r} could be cached: {counters.summary() or 'no samples'}")
        features = {
            "fingerprint": fingerprint,
            "backbone_digest": model.backbone.digest(),
            "model": model_dir,
            "preprocessing": preprocessor.settings(),
            "dtype": str(dtype or model.projector.weight.dtype).removeprefix("torch."),
            "frame_tokens_shape": list(frame_shape) if frame_shape else None,
            "videos": videos,
            "skipped": dict(counters.bad_by_reason),
            "skipped_examples": dict(counters.examples),
        }
        publish_shards(tmp, out, _manifest(urls, shards, features), replace=old)
    except BaseException:
        discard_shards(tmp, out, shards, remove_out=created)
        raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return CacheResult(
        out_dir=out,
        shards=tuple(names),
        samples=samples,
        videos=videos,
        skipped=dict(counters.bad_by_reason),
        seconds=time.perf_counter() - started,
        fingerprint=fingerprint,
    )


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return dtype


def _claim_out(out: Path, overwrite: bool) -> tuple[list[Path], bool]:
    """The earlier run's files in ``out`` (refused unless ``overwrite``) and whether ``out`` is new."""
    old = sorted(out.glob("*.tar")) + ([out / "manifest.json"] if (out / "manifest.json").exists() else [])
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({old[0].name} ...); pass overwrite=True to replace them"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return old, created


def _model_on(model, device) -> tuple[Any, str | None]:
    """The model (read from its folder when given a path) in eval mode on ``device``, and its folder."""
    from mm.model.multimodal import MultimodalModel

    model_dir = None
    if not isinstance(model, MultimodalModel):
        model_dir = str(Path(model).resolve())
        model = MultimodalModel.from_pretrained(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval().to(device), model_dir


def _cache_shard(
    url, path, model, fingerprint, preprocessor, batch_size, dtype, counters, bar
) -> _ShardCacher:
    """Write the cached form of one source shard to ``path``; returns what it wrote (counts, shape)."""
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        cacher = _ShardCacher(model, fingerprint, batch_size, dtype, tar)
        for key, fields, problem in read_shard(url, counters):
            counters.seen += 1
            bar.update(1)
            item = _prepare(key, fields, problem, url, preprocessor, counters)
            if item is not None:
                cacher.add(item)
        cacher.flush()
    return cacher


def _manifest(urls, shards: list[dict[str, Any]], features: dict[str, Any]) -> dict[str, Any]:
    """``manifest.json`` of a cached folder: the shards, the source, and what made the features."""
    return {
        "format": "mm-webdataset",
        "version": 1,
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "settings": {"source": [str(u) for u in urls], "cache_features": True},
        "features": features,
    }


def _prepare(
    key: str,
    fields: dict[str, bytes],
    problem: str | None,
    url: str,
    pre: Preprocessor,
    counters: DataCounters,
) -> _Pending | None:
    """Parse one sample and decode its videos; a bad sample is counted (as training counts it) and dropped."""
    try:
        if problem is not None:
            raise SampleError("duplicate member", problem)
        messages, media, meta = normalize_sample(fields)
    except SampleError as exc:
        counters.add_bad(exc.reason, f"{url} key {key}: {exc}")
        return None
    fields_used = _video_fields(messages)
    cached = [f for f in fields_used if is_features(f)]
    if cached:
        raise ValueError(
            f"{url} key {key}: {cached[0]!r} already holds cached features; cache the raw shards"
        )
    pixels = None
    if fields_used:
        try:
            pixels = pre.video_pixel_values([media[f] for f in fields_used])
        except Exception as exc:
            counters.add_bad(f"decode failed ({type(exc).__name__})", f"{url} key {key}: {exc}")
            return None
    return _Pending(key, messages, meta, media, fields_used, pixels)


# --------------------------------------------------------------------------- command line


def run_cache_features(args: argparse.Namespace) -> int:
    """``mm data cache-features`` (arguments: :mod:`mm.cli`)."""
    from mm.text_backbone.checkpoint import CheckpointError

    try:
        result = cache_features(
            args.model,
            args.src,
            args.out,
            num_frames=args.num_frames,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"mm data cache-features: {e}", file=sys.stderr)
        return 2
    skipped = sum(result.skipped.values())
    print(
        f"cached {result.videos} videos of {result.samples} samples into {len(result.shards)} shards in "
        f"{result.out_dir} ({result.seconds:.1f} s)"
        + (f"; skipped {skipped} bad samples: {result.skipped}" if skipped else "")
    )
    return 0
