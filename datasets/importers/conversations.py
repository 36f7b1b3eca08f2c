"""LLaVA conversation JSON and ShareGPT-style ``messages`` / ``images`` records (``--from llava``,
``--from sharegpt``).

LLaVA (``llava_v1_5_mix665k.json`` and its kin) is a JSON list of::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

with ``image`` a path relative to the image folder, or a list of paths (multi-image variants), or
absent (text-only records). ShareGPT-style records (LLaMA-Factory's ``sharegpt`` layout) hold
``messages`` of ``{"role", "content"}`` (or LLaVA-like ``conversations``) and lists ``images`` /
``videos`` / ``audios``::

    {"messages": [{"role": "user", "content": "<image>Who are they?"},
                  {"role": "assistant", "content": "They're Kane and Gretzka."}],
     "images": ["mllm_demo_data/1.jpg"]}

Conversion (:func:`~mm.datasets.importers._records.turns_to_messages`): ``human``/``user`` ->
user, ``gpt``/``assistant`` -> assistant, ``system`` kept; each ``<image>`` (``<video>``,
``<audio>``) marker becomes a media part at its place, matched in order to the record's list; a
record without markers puts its media first in the first user turn. The record's ``id`` is kept in
``meta``. Either file may be a JSON list (errors name ``FILE: record i``, from 0) or JSONL
(``FILE line n``). Media paths are relative to ``media_root`` (default: the file's folder) and
must lie inside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm.datasets._schema import PackError
from mm.datasets.importers._records import (
    ImportedSample,
    MediaFile,
    MediaList,
    media_paths,
    read_json_records,
    turns_to_messages,
)

__all__ = ["read_llava", "read_sharegpt"]

_SHAREGPT_MEDIA = {"image": "images", "video": "videos", "audio": "audios"}


def _root(src: Path, media_root: str | os.PathLike[str] | None) -> Path:
    if not src.is_file():
        raise PackError(f"{src}: expected a .json or .jsonl file")
    return Path(media_root) if media_root is not None else src.parent


def _meta(record: dict[str, Any]) -> dict[str, Any] | None:
    return {"id": record["id"]} if isinstance(record.get("id"), (str, int)) else None


def read_llava(
    src: str | os.PathLike[str], *, media_root: str | os.PathLike[str] | None = None
) -> Iterator[ImportedSample]:
    """Samples of a LLaVA conversation file (see the module docstring).

    Args:
        src: the ``.json`` (a list of records) or ``.jsonl`` file.
        media_root: the image folder the records' paths are relative to (default: ``src``'s folder).
    """
    src = Path(src)
    root = _root(src, media_root)
    for origin, record in read_json_records(src):
        if not isinstance(record, dict) or "conversations" not in record:
            raise PackError(f"{origin}: expected an object with 'conversations'")
        media = MediaList()
        images = [
            media.add("image", MediaFile(root, p), p, origin) for p in media_paths(record, "image", origin)
        ]
        messages = turns_to_messages(record["conversations"], {"image": images}, origin)
        yield ImportedSample(messages, media.items, origin, _meta(record))


def read_sharegpt(
    src: str | os.PathLike[str], *, media_root: str | os.PathLike[str] | None = None
) -> Iterator[ImportedSample]:
    """Samples of a ShareGPT-style file (see the module docstring).

    Args:
        src: the ``.json`` (a list of records) or ``.jsonl`` file.
        media_root: the folder the records' media paths are relative to (default: ``src``'s folder).
    """
    src = Path(src)
    root = _root(src, media_root)
    for origin, record in read_json_records(src):
        if not isinstance(record, dict) or not ({"messages", "conversations"} & set(record)):
            raise PackError(f"{origin}: expected an object with 'messages' (or 'conversations')")
        media = MediaList()
        fields = {
            kind: [media.add(kind, MediaFile(root, p), p, origin) for p in media_paths(record, key, origin)]
            for kind, key in _SHAREGPT_MEDIA.items()
        }
        if "messages" in record:
            messages = turns_to_messages(
                record["messages"], fields, origin, role_key="role", text_key="content"
            )
        else:
            messages = turns_to_messages(record["conversations"], fields, origin)
        yield ImportedSample(messages, media.items, origin, _meta(record))
