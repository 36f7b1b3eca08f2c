"""Hugging Face ``datasets`` saved locally (``--from hf``): VQA, captioning, chat and speech sets.

Read with the ``datasets`` library, offline (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` while
reading; its cache goes to a temporary folder removed afterwards), from

* a ``save_to_disk`` folder (``dataset_info.json`` + ``state.json``, or ``dataset_dict.json`` with
  one folder per split: ``split`` picks one, default ``train``) via ``datasets.load_from_disk``;
* ``.parquet`` or ``.arrow`` files (one file, or a folder of them as the Hub publishes them,
  ``data/train-00000-of-00002.parquet``: the files whose name starts with ``SPLIT`` or that sit in
  a ``SPLIT`` folder when there are such, else all), each via
  ``datasets.load_dataset("parquet" | "arrow", data_files=...)``.

Media are never decoded here (image and audio columns are cast to ``decode=False``): an image is
``{"bytes", "path"}`` (bytes kept as they are; no bytes: ``path`` relative to the dataset's folder)
or a path string; audio is the same, or ``{"array", "sampling_rate"}``, written as 16-bit PCM WAV.

A row becomes, with columns chosen by ``columns={ROLE: COLUMN}`` (defaults in brackets):

* a conversation, when there is a ``messages`` column [``messages`` or ``conversations``]: turns of
  ``role``/``content`` or ``from``/``value`` whose ``<image>`` markers take the row's ``images``
  [``images`` or ``image``] in order (rules of :func:`~mm.datasets.importers._records.turns_to_messages`);
* speech recognition, when there is an ``audio`` column [``audio``]: user [audio, ``prompt``
  (default "Repeat after me in English.")], assistant ``text`` [``text``, ``sentence`` or
  ``transcription``];
* visual question answering otherwise: user [image(s), ``question`` [``question``]], assistant
  ``answer`` [``answer``; a list of answers takes the first].

Errors name the file (or folder) and row, from 0: ``train-00000-of-00001.parquet row 7: ...``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mm.datasets._schema import PackError
from mm.datasets.importers._records import ImportedSample, MediaFile, MediaList, turns_to_messages
from mm.datasets.importers.speech import ASR_PROMPT

__all__ = ["DEFAULT_COLUMNS", "hf_datasets", "read_hf"]

DEFAULT_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "messages": ("messages", "conversations"),
    "images": ("images", "image"),
    "question": ("question",),
    "answer": ("answer", "answers"),
    "audio": ("audio",),
    "text": ("text", "sentence", "transcription"),
}
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"))


def hf_datasets() -> Any:
    """Hugging Face's ``datasets`` module, even where this repository's root is on ``sys.path``
    (``python -m pytest`` from it), whose ``datasets/`` folder (``mm.datasets``) would shadow it."""
    module = sys.modules.get("datasets")
    if module is not None and hasattr(module, "load_dataset"):
        return module
    ours = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if (Path(p or ".").resolve() / "datasets") != ours]
    if module is not None:  # this repository's folder imported under the wrong name: not the library
        for name in [n for n in sys.modules if n == "datasets" or n.startswith("datasets.")]:
            del sys.modules[name]
    try:
        return importlib.import_module("datasets")
    finally:
        sys.path[:] = saved


@contextlib.contextmanager
def _offline() -> Iterator[Any]:
    """The ``datasets`` module with network access off (environment and its read-once config)."""
    saved = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    os.environ.update(dict.fromkeys(_OFFLINE_VARS, "1"))
    datasets = hf_datasets()
    config = {k: getattr(datasets.config, k) for k in _OFFLINE_VARS}
    for k in _OFFLINE_VARS:
        setattr(datasets.config, k, True)
    try:
        yield datasets
    finally:
        for k, v in config.items():
            setattr(datasets.config, k, v)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _undecoded(datasets: Any, ds: Any) -> Any:
    """``ds`` with its image and audio columns (and lists of them) left as bytes / paths."""
    features = datasets.features
    for name, feature in ds.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, (features.Image, features.Audio)):
            ds = ds.cast_column(name, type(feature)(decode=False))
        elif isinstance(inner, (features.Image, features.Audio)):
            ds = ds.cast_column(name, features.List(type(inner)(decode=False)))
    return ds


def _tables(datasets: Any, src: Path, split: str, cache: str) -> Iterator[tuple[str, Path, Any]]:
    """``(name for errors, media folder, dataset)`` of every table of the source."""
    if src.is_dir() and (src / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(src))
        if split not in dd:
            raise PackError(f"{src}: no split {split!r} (has {sorted(dd)})")
        yield f"{src.name}/{split}", src, dd[split]
        return
    if src.is_dir() and (src / "state.json").is_file():
        yield src.name, src, datasets.load_from_disk(str(src))
        return
    if src.is_file():
        files = [src]
    elif src.is_dir():
        files = sorted(src.rglob("*.parquet")) or sorted(src.rglob("*.arrow"))
        chosen = [f for f in files if f.name.startswith(split) or split in f.relative_to(src).parts[:-1]]
        files = chosen or files
    else:
        raise PackError(f"{src}: no such file or folder")
    if not files or files[0].suffix not in (".parquet", ".arrow"):
        raise PackError(f"{src}: expected a save_to_disk folder or .parquet / .arrow files")
    for file in files:
        builder = file.suffix[1:]
        ds = datasets.load_dataset(builder, data_files=[str(file)], split="train", cache_dir=cache)
        yield file.name, file.parent, ds


def _column(row: Mapping[str, Any], role: str, columns: Mapping[str, str]) -> str | None:
    if role in columns:
        if columns[role] not in row:
            raise PackError(f"column {columns[role]!r} (for {role}) not in the data; columns: {sorted(row)}")
        return columns[role]
    return next((c for c in DEFAULT_COLUMNS[role] if c in row), None)


def _image_ext(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "png")


def _add(media: MediaList, kind: str, value: Any, root: Path, origin: str) -> str:
    """One image / audio cell as a medium of the sample."""
    if isinstance(value, str):
        return media.add(kind, MediaFile(root, value), value, origin)
    if not isinstance(value, dict):
        raise PackError(f"{origin}: {kind} cell is a {type(value).__name__}, not a path or an object")
    if value.get("array") is not None and kind == "audio":
        import numpy as np
        import soundfile

        buffer = io.BytesIO()
        try:
            soundfile.write(
                buffer,
                np.asarray(value["array"], dtype=np.float32),
                int(value["sampling_rate"]),
                format="WAV",
                subtype="PCM_16",
            )
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise PackError(f"{origin}: audio array cannot be written as WAV ({exc})") from exc
        return media.add(kind, buffer.getvalue(), "audio.wav", origin)
    data, path = value.get("bytes"), value.get("path")
    if isinstance(data, bytes) and data:
        name = path if isinstance(path, str) and "." in path.rsplit("/", 1)[-1] else ""
        if kind == "image" and not name:
            name = f"image.{_image_ext(data)}"
        return media.add(kind, data, name or f"{kind}.wav", origin)
    if isinstance(path, str) and path:
        return media.add(kind, MediaFile(root, path), path, origin)
    raise PackError(f"{origin}: {kind} cell has neither bytes nor a path")


def _cells(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _row_sample(
    row: dict[str, Any], columns: Mapping[str, str], root: Path, prompt: str, origin: str
) -> ImportedSample:
    try:
        turns, images = _column(row, "messages", columns), _column(row, "images", columns)
        audio, text = _column(row, "audio", columns), _column(row, "text", columns)
        question, answer = _column(row, "question", columns), _column(row, "answer", columns)
    except PackError as exc:
        raise PackError(f"{origin}: {exc}") from None
    media = MediaList()
    fields = [_add(media, "image", v, root, origin) for v in _cells(row[images])] if images else []
    if turns is not None:
        first = row[turns][0] if isinstance(row[turns], list) and row[turns] else {}
        keys = ("role", "content") if isinstance(first, dict) and "role" in first else ("from", "value")
        messages = turns_to_messages(
            row[turns], {"image": fields}, origin, role_key=keys[0], text_key=keys[1]
        )
    elif audio is not None:
        if text is None:
            raise PackError(f"{origin}: an audio column but no transcript column ({DEFAULT_COLUMNS['text']})")
        clip = _add(media, "audio", row[audio], root, origin)
        messages = [
            {"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": _text(row[text], text, origin)},
        ]
    elif question is not None and answer is not None:
        parts = [{"type": "image", "image": f} for f in fields]
        parts.append({"type": "text", "text": _text(row[question], question, origin)})
        messages = [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": _text(row[answer], answer, origin)},
        ]
    else:
        raise PackError(f"{origin}: no conversation, audio or question/answer columns in {sorted(row)}")
    return ImportedSample(messages, media.items, origin, None)


def _text(value: Any, column: str, origin: str) -> str:
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str):
        raise PackError(f"{origin}: column {column!r} holds a {type(value).__name__}, not text")
    return value.strip()


def read_hf(
    src: str | os.PathLike[str],
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    prompt: str = ASR_PROMPT,
) -> Iterator[ImportedSample]:
    """Samples of a locally saved Hugging Face dataset (see the module docstring).

    Args:
        src: a ``save_to_disk`` folder, a ``.parquet`` / ``.arrow`` file or a folder of them.
        split: the split to read (a ``DatasetDict`` key, or the file-name prefix / folder).
        columns: ``{role: column}`` overriding the defaults; roles: ``messages``, ``images``,
            ``question``, ``answer``, ``audio``, ``text``.
        prompt: the user prompt of speech rows.
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if unknown:
        raise PackError(f"unknown column role(s) {unknown}; use {sorted(DEFAULT_COLUMNS)}")
    with _offline() as datasets, tempfile.TemporaryDirectory(prefix="mm-hf-cache-") as cache:
        for name, root, ds in _tables(datasets, Path(src), split, cache):
            ds = _undecoded(datasets, ds)
            for i, row in enumerate(ds):
                yield _row_sample(row, columns, root, prompt, f"{name} row {i}")
