"""What every importer shares: the sample it yields, media references, turns -> messages, record files.

An importer reads a published layout and yields :class:`ImportedSample` s: Llama 3 chat messages
whose media parts name the sample's media by field (``0.jpg``, ``1.flac``), and those media as
files of the source (:class:`MediaFile`) or bytes. Nothing is checked to decode here:
:func:`mm.datasets.shards.pack_samples` runs the checks of ``mm data pack`` on every sample.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm.datasets._schema import MEDIA_KINDS, PackError, media_kind

__all__ = [
    "ImportedSample",
    "MediaFile",
    "MediaList",
    "read_json_records",
    "turns_to_messages",
]

ROLE_NAMES: Mapping[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MARKERS: Mapping[str, str] = {"image": "<image>", "video": "<video>", "audio": "<audio>"}


@dataclass(frozen=True)
class MediaFile:
    """A media file of the source: ``root / path``, which must lie inside ``root``."""

    root: Path
    path: str


@dataclass(frozen=True)
class ImportedSample:
    """One sample read from a published layout.

    Attributes:
        messages: Llama 3 chat messages; media parts name fields of ``media``.
        media: field (``0.jpg``) -> a :class:`MediaFile` or the medium's bytes.
        origin: where it came from, for errors (``train.json: record 12``, ``dev.tsv line 4``).
        meta: what else is worth keeping (source id, speaker ...), or None.
    """

    messages: list[dict[str, Any]]
    media: dict[str, MediaFile | bytes]
    origin: str
    meta: dict[str, Any] | None = None


@dataclass
class MediaList:
    """The media of one sample being built: :meth:`add` returns the field a media part names."""

    items: dict[str, MediaFile | bytes] = field(default_factory=dict)

    def add(self, kind: str, source: MediaFile | bytes, name: str, origin: str) -> str:
        """Add a medium of ``kind``; ``name`` (a path or file name) gives the extension."""
        ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
        if ext not in MEDIA_KINDS[kind]:
            exts = " ".join(sorted(MEDIA_KINDS[kind]))
            raise PackError(f"{origin}: {kind} {name!r} does not end in one of: {exts}")
        field_name = f"{len(self.items)}.{ext}"
        self.items[field_name] = source
        return field_name


def _split_markers(
    text: str, kind_of: Mapping[str, str], fields: dict[str, list[str]], origin: str, where: str
) -> list[dict[str, Any]]:
    """Parts of one turn: text, and a media part at each marker (taking that kind's next field)."""
    parts: list[dict[str, Any]] = []
    for piece in re.split("(" + "|".join(re.escape(m) for m in kind_of) + ")", text):
        kind = kind_of.get(piece)
        if kind is None:
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
            continue
        if not fields[kind]:
            raise PackError(f"{origin}: {where} has more {piece} markers than {kind}s")
        parts.append({"type": kind, kind: fields[kind].pop(0)})
    return parts


def turns_to_messages(
    turns: Any,
    media: Mapping[str, Sequence[str]],
    origin: str,
    *,
    role_key: str = "from",
    text_key: str = "value",
    markers: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Conversation turns with ``<image>`` / ``<video>`` / ``<audio>`` markers -> mm messages.

    Rules: roles ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system`` kept;
    each marker becomes a media part at its place, taking the next medium of its kind in order
    (whitespace around a marker is dropped); when no turn holds a marker of a kind, that kind's
    media go first, in order, in the first user turn. Markers may only appear in user turns and
    must match the media one for one. A turn without media keeps its text as a string.

    Args:
        turns: the record's list of turns.
        media: kind -> the fields (from :class:`MediaList`) of that kind, in order.
        origin: the record, for errors.
        role_key, text_key: the keys of a turn (``from``/``value`` or ``role``/``content``).
        markers: kind -> its marker where not the default (video QA marks its video ``<image>``).
    """
    if not isinstance(turns, list) or not turns:
        raise PackError(f"{origin}: the conversation must be a non-empty list of turns")
    marker_of = {k: (markers or {}).get(k, MARKERS[k]) for k in media}
    remaining = {kind: list(fields) for kind, fields in media.items() if fields}
    texts: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise PackError(f"{origin}: turn {i} must be an object with {role_key!r} and {text_key!r}")
        role = ROLE_NAMES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise PackError(
                f"{origin}: turn {i} has {role_key} {turn[role_key]!r}, not one of {sorted(ROLE_NAMES)}"
            )
        if not isinstance(turn[text_key], str):
            raise PackError(f"{origin}: turn {i}: {text_key!r} must be a string")
        texts.append((role, turn[text_key]))
    marked = {k for k in remaining if any(marker_of[k] in t for _, t in texts)}
    kind_of = {marker_of[k]: k for k in marked}
    first_user = next((i for i, (role, _) in enumerate(texts) if role == "user"), None)
    if remaining and first_user is None:
        raise PackError(f"{origin}: has media but no user turn to put them in")
    messages: list[dict[str, Any]] = []
    for i, (role, text) in enumerate(texts):
        has_marker = any(m in text for m in kind_of)
        if has_marker and role != "user":
            raise PackError(f"{origin}: turn {i} ({role}) holds a media marker; only user turns may")
        parts = _split_markers(text, kind_of, remaining, origin, f"turn {i}") if has_marker else []
        if i == first_user:
            front = [{"type": k, k: f} for k in remaining if k not in marked for f in remaining[k]]
            if front and not has_marker:
                parts = [{"type": "text", "text": text.strip()}] if text.strip() else []
            parts = front + parts
        messages.append({"role": role, "content": parts if parts else text})
    for kind in marked:
        if remaining[kind]:
            raise PackError(
                f"{origin}: {len(media[kind])} {kind}(s) but only "
                f"{len(media[kind]) - len(remaining[kind])} {marker_of[kind]} marker(s)"
            )
    return messages


def read_json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(origin, record)`` of a JSON list (``name: record i``, from 0 as in ``data[i]``) or a
    JSONL file (``name line n``, from 1)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackError(f"cannot read {path}: {exc}") from exc
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            origin = f"{path.name} line {lineno}"
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as exc:
                raise PackError(f"{origin}: bad JSON ({exc})") from exc
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PackError(f"{path.name} line {exc.lineno}: bad JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise PackError(f"{path.name}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path.name}: record {i}", record


def media_paths(record: Mapping[str, Any], key: str, origin: str) -> list[str]:
    """A record's ``key`` as a list of path strings (a string or a list of strings; absent: [])."""
    value = record.get(key)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise PackError(f"{origin}: {key!r} must be a path or a list of paths")
    return values


def check_kind(name: str, kind: str, origin: str) -> None:
    """Refuse a path whose extension is not one of ``kind``'s."""
    if media_kind(name) != kind:
        raise PackError(
            f"{origin}: {kind} {name!r} does not end in one of: {' '.join(sorted(MEDIA_KINDS[kind]))}"
        )
