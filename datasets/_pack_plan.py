"""Planning a pack: every sample of a source folder or JSONL manifest, read and checked.

:func:`plan_source` turns the input of :func:`mm.datasets.shards.pack` into :class:`Plan` s, one
per sample, before anything is written. Files are reached only through
:class:`~mm.datasets._source_files.SourceFolder` (inside the source, regular files only) and each
sample passes the checks of :mod:`mm.datasets._pack_checks` (media decode; text, key and JSON
limits). Media are read once here, to be checked and fingerprinted; the writer reads them again
and refuses any that changed in between. The first problem aborts with a :class:`PackError`
naming the file or manifest line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm.datasets._pack_checks import (
    MAX_JSON_BYTES,
    MAX_MEDIA_BYTES,
    check_field,
    check_key,
    check_medium,
    check_message_texts,
    check_meta,
    check_text,
    parse_json,
)
from mm.datasets._schema import (
    FEATURES_EXTENSION,
    MEDIA_KINDS,
    PREFERENCE_ANSWERS,
    TEXT_FIELDS,
    PackError,
    SampleError,
    caption_messages,
    check_messages,
    check_preference,
    is_preference,
    media_kind,
    rewrite_media,
    split_member_name,
)
from mm.datasets._source_files import FileRefused, SourceFile, SourceFolder, open_regular, read_regular

__all__ = ["Member", "Plan", "hasher", "plan_source"]

_PREFERENCE_KEYS = frozenset(PREFERENCE_ANSWERS)
_MESSAGE_KEYS = frozenset({"messages", "key", "meta"}) | _PREFERENCE_KEYS
_CAPTION_KEYS = frozenset({"caption", "prompt", "key", "meta"})


@dataclass(frozen=True)
class Member:
    """One tar member of a sample: ``KEY.FIELD``, inline bytes or a checked source file."""

    field: str
    data: bytes | None = None  # inline member (the json)
    file: SourceFile | None = None  # or a file copied byte for byte ...
    size: int = 0  # ... whose size and digest were taken when it was checked:
    digest: bytes = b""  # what is written must be exactly what was checked


@dataclass(frozen=True)
class Plan:
    """One checked sample: its key (NFC), its members, and where it came from."""

    key: str
    members: tuple[Member, ...]
    origin: str  # where it came from, for error messages


def _checked(origin: str, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``check(*args, **kwargs)``, its ``ValueError`` turned into a :class:`PackError` naming ``origin``."""
    try:
        return check(*args, **kwargs)
    except PackError:
        raise
    except ValueError as exc:
        raise PackError(f"{origin}: {exc}" if origin else str(exc)) from exc


def _json_member(obj: Mapping[str, Any]) -> Member:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return Member(field="json", data=text.encode("utf-8"))


def hasher(data: bytes = b"") -> Any:
    """The hash that fingerprints a file between its check and its copy (fed ``data`` so far)."""
    return hashlib.blake2b(data, digest_size=16)


def _media_member(field: str, file: SourceFile, where: str) -> Member:
    """A media member read, checked to decode, and fingerprinted; errors name ``where`` + the file."""
    prefix = f"{where}: " if where else ""
    try:
        data = read_regular(file.real, file.shown, limit=MAX_MEDIA_BYTES, what="MAX_MEDIA_BYTES")
    except FileRefused as exc:
        raise PackError(f"{prefix}{exc}") from exc
    _checked(f"{prefix}{file.shown}", check_medium, data, media_kind(field) or "", field)
    return Member(field=field, file=file, size=len(data), digest=hasher(data).digest())


def _read_sample_text(file: SourceFile) -> str:
    """A folder's ``.json`` / ``.txt``: a regular file of at most ``MAX_JSON_BYTES``, UTF-8."""
    data = _checked("", read_regular, file.real, file.shown, limit=MAX_JSON_BYTES, what="MAX_JSON_BYTES")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackError(f"{file.shown}: not UTF-8 text ({exc})") from exc


def _caption_json(
    kind: str, field: str, caption: Any, prompt: Any, meta: Any, caption_prompt: str | None, origin: str
) -> dict[str, Any]:
    _checked(origin, check_text, caption, "caption")
    if prompt is not None:
        _checked(origin, check_text, prompt, "prompt")
    if caption_prompt is not None:
        obj: dict[str, Any] = {"messages": caption_messages(kind, field, caption, prompt or caption_prompt)}
    else:
        obj = {"caption": caption}
        if prompt is not None:
            obj["prompt"] = prompt
    if meta is not None:
        _checked(origin, check_meta, meta)
        obj["meta"] = meta
    return obj


def _messages_json(row: Mapping[str, Any], mapping: Mapping[str, str], origin: str) -> dict[str, Any]:
    obj: dict[str, Any] = {"messages": rewrite_media(row["messages"], mapping)}
    for name in PREFERENCE_ANSWERS:  # checked by _checked_refs
        if name in row:
            obj[name] = row[name]
    if "meta" in row:
        _checked(origin, check_meta, row["meta"])
        obj["meta"] = row["meta"]
    return obj


def _checked_refs(row: Mapping[str, Any], origin: str) -> list[tuple[str, str]]:
    """The media references of a ``messages`` row whose structure and texts pass."""
    try:
        refs = check_messages(row["messages"])
    except SampleError as exc:
        raise PackError(f"{origin}: {exc}") from exc
    _checked(origin, check_message_texts, row["messages"])
    if is_preference(row):
        try:
            answers = check_preference(row)
        except SampleError as exc:
            raise PackError(f"{origin}: {exc}") from exc
        for name, answer in answers.items():
            _checked(origin, check_text, answer, name)
    return refs


# ............................................................ manifest


def _manifest_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a JSONL file, one line at a time, each within ``MAX_JSON_BYTES``."""
    try:
        file, _ = open_regular(path.resolve(), str(path))
    except FileRefused as exc:
        raise PackError(f"cannot read manifest {path}: {exc}") from exc
    with file:
        for lineno in itertools.count(1):
            raw = file.readline(MAX_JSON_BYTES + 1)
            if not raw:
                return
            if not raw.endswith(b"\n") and len(raw) > MAX_JSON_BYTES:
                raise PackError(
                    f"{path.name} line {lineno}: line is longer than {MAX_JSON_BYTES} bytes (MAX_JSON_BYTES)"
                )
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise PackError(f"{path.name} line {lineno}: not UTF-8 text ({exc})") from exc


def _field_of(path: str) -> str:
    """A member field from a file name: its last extension (``png``), or two for video features."""
    parts = path.rsplit("/", 1)[-1].lower().split(".")
    return ".".join(parts[-2:]) if parts[-1] == FEATURES_EXTENSION and len(parts) > 2 else parts[-1]


def _manifest_file(folder: SourceFolder, value: str, kind: str, origin: str) -> SourceFile:
    """The file a manifest row names, relative to the manifest's folder and inside it (unless allowed)."""
    if media_kind(value) != kind:
        exts = " ".join(sorted(MEDIA_KINDS[kind]))
        raise PackError(f"{origin}: {kind} {value!r} does not end in one of: {exts}")
    if os.path.isabs(value) and not folder.allow_outside:
        raise PackError(
            f"{origin}: {kind} {value!r} is an absolute path; manifest paths are relative to its folder "
            "(pass --allow-outside-source / allow_outside_source=True to allow others)"
        )
    path = folder.root / value
    shown = f"{kind} {value!r}"
    try:
        return SourceFile(shown, folder.locate(path, shown))
    except FileNotFoundError:
        raise PackError(f"{origin}: {kind} file {value!r} not found (looked for {path})") from None
    except FileRefused as exc:
        raise PackError(f"{origin}: {exc}") from exc


def _manifest_messages(row: dict[str, Any], key: str, folder: SourceFolder, origin: str) -> Plan:
    unknown = set(row) - _MESSAGE_KEYS
    if unknown:
        raise PackError(f"{origin}: unknown keys {sorted(unknown)}; allowed: {sorted(_MESSAGE_KEYS)}")
    mapping: dict[str, str] = {}
    members: list[Member] = []
    for kind, value in _checked_refs(row, origin):
        if value in mapping:
            continue
        file = _manifest_file(folder, value, kind, origin)
        mapping[value] = f"{len(members)}.{_field_of(value)}"
        members.append(_media_member(mapping[value], file, origin))
    return Plan(key, (_json_member(_messages_json(row, mapping, origin)), *members), origin)


def _manifest_caption(
    row: dict[str, Any], key: str, folder: SourceFolder, caption_prompt: str | None, origin: str
) -> Plan:
    kinds = [k for k in MEDIA_KINDS if k in row]
    if len(kinds) != 1 or "caption" not in row:
        raise PackError(
            f"{origin}: expected 'messages', or one of 'image' / 'video' / 'audio' with 'caption'; "
            f"got keys {sorted(row)}"
        )
    kind = kinds[0]
    unknown = set(row) - _CAPTION_KEYS - {kind}
    if unknown:
        raise PackError(f"{origin}: unknown keys {sorted(unknown)}")
    if not isinstance(row[kind], str):
        raise PackError(f"{origin}: {kind!r} must be a path string")
    file = _manifest_file(folder, row[kind], kind, origin)
    field = _field_of(row[kind])
    obj = _caption_json(
        kind, field, row["caption"], row.get("prompt"), row.get("meta"), caption_prompt, origin
    )
    return Plan(key, (_json_member(obj), _media_member(field, file, origin)), origin)


def _plan_manifest(path: Path, caption_prompt: str | None, allow_outside: bool) -> Iterator[Plan]:
    folder = SourceFolder.at(
        path.absolute().parent, allow_outside=allow_outside, label="the manifest's folder"
    )
    for lineno, line in _manifest_lines(path):
        if not line.strip():
            continue
        origin = f"{path.name} line {lineno}"
        row = _checked(origin, parse_json, line)
        if not isinstance(row, dict):
            raise PackError(f"{origin}: expected a JSON object, got {type(row).__name__}")
        key = _checked(origin, check_key, row["key"]) if "key" in row else f"{lineno:09d}"
        if "messages" in row:
            yield _manifest_messages(row, key, folder, origin)
        elif is_preference(row):
            raise PackError(f"{origin}: a preference sample needs 'messages' (its prompt)")
        else:
            yield _manifest_caption(row, key, folder, caption_prompt, origin)


# ............................................................ folder


def _media_like_dir(name: str) -> str | None:
    """Why a directory may not have this name (it reads as a media or caption file), or None."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in TEXT_FIELDS or media_kind(name) is not None:
        return f"its name ends in .{ext} like a media or caption file"
    return None


def _group_folder(folder: SourceFolder, exclude: Path) -> dict[str, dict[str, SourceFile]]:
    """The regular files of a source folder by key, then field (``foo.0.png`` -> ``foo``, ``0.png``)."""
    groups: dict[str, dict[str, SourceFile]] = {}
    try:
        for file in folder.walk(exclude=exclude, skip_dir=_media_like_dir):
            _add_to_group(groups, file)
    except FileRefused as exc:
        raise PackError(str(exc)) from exc
    return groups


def _add_to_group(groups: dict[str, dict[str, SourceFile]], file: SourceFile) -> None:
    """File ``foo.0.png`` into ``groups["foo"]["0.png"]``, refusing names no sample can use."""
    rel, name = file.shown, file.shown.rsplit("/", 1)[-1]
    key, field = split_member_name(rel)
    if key is None or field is None:
        raise PackError(f"{rel}: a file name needs an extension (e.g. {name}.jpg)")
    key = _checked(rel, check_key, key)
    field = _checked(rel, check_field, field.lower())
    ext = field.rsplit(".", 1)[-1]
    if ext not in TEXT_FIELDS and media_kind(field) is None:
        allowed = " ".join(sorted(TEXT_FIELDS.union(*MEDIA_KINDS.values())))
        raise PackError(f"{rel}: unknown extension {'.' + ext!r}; allowed: {allowed}")
    if ext in TEXT_FIELDS and field != ext:
        raise PackError(f"{rel}: expected {key}.{ext}, one text file per sample")
    group = groups.setdefault(key, {})
    if field in group:
        raise PackError(f"{rel}: clashes with {group[field].shown}")
    group[field] = file


def _folder_messages(key: str, row: dict[str, Any], media: dict[str, SourceFile], origin: str) -> Plan:
    unknown = set(row) - {"messages", "meta"} - _PREFERENCE_KEYS
    if unknown:
        raise PackError(f"{origin}: unknown keys {sorted(unknown)}")
    refs = _checked_refs(row, origin)
    by_name = {
        **{f.shown.rsplit("/", 1)[-1].lower(): field for field, f in media.items()},
        **{f: f for f in media},
    }
    mapping: dict[str, str] = {}
    for kind, value in refs:
        field = by_name.get(value.lower())
        if field is None:
            raise PackError(f"{origin}: {kind} {value!r} is not a file of sample {key!r}")
        if media_kind(field) != kind:
            raise PackError(f"{origin}: {value!r} is not a {kind}")
        mapping[value] = field
    unused = sorted(set(media) - set(mapping.values()))
    if unused:
        names = [media[f].shown.rsplit("/", 1)[-1] for f in unused]
        raise PackError(f"{origin}: media {names} not used by any message")
    members = [_media_member(field, file, "") for field, file in media.items()]
    return Plan(key, (_json_member(_messages_json(row, mapping, origin)), *members), origin)


def _folder_sample(key: str, files: dict[str, SourceFile], caption_prompt: str | None) -> Plan:
    """One sample of a folder: ``KEY.json`` (messages or caption) or ``KEY.txt``, and its media."""
    origin = f"{key}.*"
    media = {f: file for f, file in sorted(files.items()) if f not in TEXT_FIELDS}
    if "json" in files:
        origin = files["json"].shown
        if "txt" in files:
            raise PackError(f"{origin}: has both a .json and a .txt; keep one")
        row = _checked(origin, parse_json, _read_sample_text(files["json"]))
        if not isinstance(row, dict):
            raise PackError(f"{origin}: expected a JSON object")
        if "messages" in row:
            return _folder_messages(key, row, media, origin)
        if is_preference(row):
            raise PackError(f"{origin}: a preference sample needs 'messages' (its prompt)")
        if "caption" not in row:
            raise PackError(f"{origin}: needs 'messages' or 'caption'")
        unknown = set(row) - {"caption", "prompt", "meta"}
        if unknown:
            raise PackError(f"{origin}: unknown keys {sorted(unknown)}")
        caption, prompt, meta = row["caption"], row.get("prompt"), row.get("meta")
    elif "txt" in files:
        origin = files["txt"].shown
        caption, prompt, meta = _read_sample_text(files["txt"]).strip(), None, None
    else:
        raise PackError(f"{origin}: media without {key}.json or {key}.txt")
    if len(media) != 1:
        raise PackError(f"{origin}: a caption needs exactly one media file, found {len(media)}")
    ((field, file),) = media.items()
    obj = _caption_json(media_kind(field) or "", field, caption, prompt, meta, caption_prompt, origin)
    return Plan(key, (_json_member(obj), _media_member(field, file, "")), origin)


def _plan_folder(folder: SourceFolder, caption_prompt: str | None, exclude: Path) -> Iterator[Plan]:
    groups = _group_folder(folder, exclude)
    for key in sorted(groups):
        yield _folder_sample(key, groups[key], caption_prompt)


def plan_source(src: Path, out: Path, caption_prompt: str | None, allow_outside: bool) -> list[Plan]:
    """Every sample of ``src``, checked, with keys unique (after NFC normalisation)."""
    if src.is_dir():
        folder = SourceFolder.at(src, allow_outside=allow_outside)
        plans = list(_plan_folder(folder, caption_prompt, exclude=out.resolve()))
    elif src.is_file():
        plans = list(_plan_manifest(src, caption_prompt, allow_outside))
    else:
        raise PackError(f"source {src} is neither a folder nor a manifest file")
    if not plans:
        raise PackError(f"no samples found in {src}")
    seen: dict[str, str] = {}
    for plan in plans:
        if plan.key in seen:
            raise PackError(f"{plan.origin}: key {plan.key!r} is also used by {seen[plan.key]}")
        seen[plan.key] = plan.origin
    return plans
