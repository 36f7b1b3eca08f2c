"""Caption pairs in webdataset shards as img2dataset publishes them (``--from wds``).

img2dataset's ``--output_format webdataset`` writes ``00000.tar``, ``00001.tar`` ... each holding,
per sample, ``000000000.jpg`` (or ``.png`` / ``.webp``), ``000000000.txt`` (the caption) and/or
``000000000.json`` (``caption``, ``url``, ``key``, ``status``, sizes, ``exif`` ...), with
``00000.parquet`` and ``00000_stats.json`` beside each tar.

Training reads such shards directly (:mod:`mm.datasets.webdata` takes them as caption pairs with
the default caption prompt); this importer repacks them into validated mm shards for those who
want them: user [image, prompt], assistant caption (the ``.txt``, else the json's ``caption``),
with the json's other keys in ``meta``. ``prompt`` defaults to the image caption prompt of
:data:`mm.datasets.shards.DEFAULT_CAPTION_PROMPTS`. ``src`` is the output folder (every ``*.tar``
in it, sorted) or one tar; errors name ``TAR key KEY``.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm.datasets._schema import DEFAULT_CAPTION_PROMPTS, IMAGE_EXTENSIONS, PackError, split_member_name
from mm.datasets.importers._records import ImportedSample, MediaList

__all__ = ["read_wds"]


def _members(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {field: bytes})`` of a tar, members of a key being adjacent (as webdataset requires)."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member_key, field = split_member_name(info.name)
                if member_key is None or field is None:
                    raise PackError(f"{path.name} member {info.name!r}: no extension")
                if member_key != key:
                    if key is not None:
                        yield key, fields
                    key, fields = member_key, {}
                field = field.lower()
                if field in fields:
                    raise PackError(f"{path.name} key {key}: member {info.name!r} occurs twice")
                extracted = tar.extractfile(info)
                assert extracted is not None
                fields[field] = extracted.read()
                tar.members = []
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackError(f"{path.name}: unreadable tar ({type(exc).__name__}: {exc})") from exc
    if key is not None:
        yield key, fields


def _sample(key: str, fields: dict[str, bytes], prompt: str, origin: str) -> ImportedSample:
    images = [f for f in fields if f in IMAGE_EXTENSIONS]
    unknown = sorted(set(fields) - set(images) - {"txt", "json"})
    if unknown or len(images) != 1:
        raise PackError(
            f"{origin}: expected one image (.jpg .png .webp) with .txt / .json, found {sorted(fields)}"
        )
    obj: Any = {}
    if "json" in fields:
        try:
            obj = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackError(f"{origin}: bad .json ({exc})") from exc
        if not isinstance(obj, dict):
            raise PackError(f"{origin}: the .json is not an object")
    caption: Any = None
    if "txt" in fields:
        try:
            caption = fields["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise PackError(f"{origin}: the .txt is not UTF-8 ({exc})") from exc
    if not caption:
        caption = obj.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise PackError(f"{origin}: no caption (an empty .txt and no 'caption' in the .json)")
    media = MediaList()
    image = media.add("image", fields[images[0]], f"{key}.{images[0]}", origin)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": caption.strip()},
    ]
    meta = {k: v for k, v in obj.items() if k != "caption"}
    return ImportedSample(messages, media.items, origin, meta or None)


def read_wds(
    src: str | os.PathLike[str], *, prompt: str = DEFAULT_CAPTION_PROMPTS["image"]
) -> Iterator[ImportedSample]:
    """Samples of img2dataset webdataset output (see the module docstring)."""
    src = Path(src)
    tars = sorted(src.glob("*.tar")) if src.is_dir() else [src]
    if not tars or not tars[0].is_file():
        raise PackError(f"{src}: no .tar shards")
    for tar in tars:
        for key, fields in _members(tar):
            yield _sample(key, fields, prompt, f"{tar.name} key {key}")
