"""mm's sample schema and the webdataset shard writer (``mm data pack``).

Training data are webdataset shards: plain POSIX ``.tar`` files in which the members of one sample
sit next to each other and share a *key* (the member name up to the first dot of its base name);
what follows that dot is the member's *field* (``abc.0.png`` -> key ``abc``, field ``0.png``).

One mm sample is one key with

* ``KEY.json``: ``{"messages": [...]}`` in Llama 3 chat-message form (the chat format of "The Llama
  3 Herd of Models", section 4.1.1, with media parts as in sections 7 and 8)::

      [{"role": "user", "content": [{"type": "image", "image": "0.png"},
                                    {"type": "text", "text": "What colour is the shape?"}]},
       {"role": "assistant", "content": "red"}]

  Roles are ``system``, ``user``, ``assistant``; content is a string or a list of parts; a media
  part ``{"type": KIND, KIND: FIELD}`` names a media member of the same sample by its field.
  Optional ``"meta"`` holds anything else worth keeping (source, licence, ...).
* media members, stored as the original bytes (never re-encoded), whose last extension gives the
  kind: image ``jpg jpeg png webp``, video ``mp4 webm mkv mov``, audio ``flac wav mp3 ogg``.
  A video may instead be a *features member* ``FIELD.safetensors`` (e.g. ``0.mp4.safetensors``):
  the frame tokens the frozen image encoder computed for video ``FIELD`` once, written by
  ``mm data cache-features`` (:mod:`mm.training.cache_features`); it counts as a video.

A plain caption pair may instead be ``KEY.json = {"caption": str}`` (optionally ``"prompt": str``)
plus exactly one media member (``KEY.jpg``). Readers turn it into messages: user [media, prompt],
assistant caption, with a default prompt per kind (:data:`DEFAULT_CAPTION_PROMPTS`).

:func:`pack` writes such shards from

* a **folder**: files grouped by key (``foo.jpg`` + ``foo.json`` or ``foo.txt``; several media for
  one key as ``foo.0.png foo.1.png`` + ``foo.json`` whose media parts name ``0.png`` or
  ``foo.0.png``); sub-folders become part of the key; hidden files are ignored;
* a **JSONL manifest**: one sample per line, ``{"messages": [...]}`` whose media parts hold paths
  (relative to the manifest's folder), or ``{"image" | "video" | "audio": path, "caption": str}``
  with optional ``"prompt"``; either form may add ``"key"`` (the tar key) and ``"meta"``.

Every sample is validated before the first byte is written; any problem aborts the pack with a
:class:`PackError` naming the file or manifest line. Shards are written into a hidden temporary
folder inside ``out_dir`` and moved into place only when all of them are complete, and
``manifest.json`` is written last, so a failed pack leaves no shard behind. Member order, names,
modes and times are fixed, so packing the same input twice gives identical bytes.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm.text_backbone.chat_format import ROLES

__all__ = [
    "AUDIO_EXTENSIONS",
    "DEFAULT_CAPTION_PROMPTS",
    "DEFAULT_SHARD_BYTES",
    "FEATURES_EXTENSION",
    "IMAGE_EXTENSIONS",
    "MEDIA_KINDS",
    "PICKLE_EXTENSIONS",
    "PackError",
    "PackResult",
    "SampleError",
    "VIDEO_EXTENSIONS",
    "add_member",
    "caption_messages",
    "check_messages",
    "discard_shards",
    "is_features",
    "media_kind",
    "pack",
    "parse_size",
    "publish_shards",
    "rewrite_media",
    "split_member_name",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mkv", "mov"})
AUDIO_EXTENSIONS = frozenset({"flac", "wav", "mp3", "ogg"})
MEDIA_KINDS: Mapping[str, frozenset[str]] = {
    "image": IMAGE_EXTENSIONS,
    "video": VIDEO_EXTENSIONS,
    "audio": AUDIO_EXTENSIONS,
}
# Cached encoder outputs of a video (``0.mp4.safetensors``): tensors and a JSON header, no code.
FEATURES_EXTENSION = "safetensors"
# Members that hold pickles (webdataset's default decoder would unpickle them): never decoded.
PICKLE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pt", "pth"})
TEXT_FIELDS = frozenset({"json", "txt"})
DEFAULT_CAPTION_PROMPTS: Mapping[str, str] = {
    "image": "Describe the image.",
    "video": "Describe the video.",
    "audio": "Transcribe the audio.",
}

DEFAULT_SHARD_BYTES = 64 * 1024**2
_MTIME = 0  # fixed member time: packing twice gives identical bytes
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_NAME_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / field split
_MESSAGE_KEYS = frozenset({"messages", "key", "meta"})
_CAPTION_KEYS = frozenset({"caption", "prompt", "key", "meta"})


class SampleError(ValueError):
    """A sample that does not follow mm's schema. ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class PackError(ValueError):
    """Input that :func:`pack` refuses; the message names the file or manifest line."""


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote.

    Attributes:
        out_dir: the folder holding the shards and ``manifest.json``.
        shards: shard file names in order (``{prefix}-{i:06d}.tar``).
        samples: number of samples written.
        bytes: total size of the shards in bytes.
    """

    out_dir: Path
    shards: tuple[str, ...]
    samples: int
    bytes: int


# --------------------------------------------------------------------------- schema helpers


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """Split a tar member name into (key, field) as webdataset does: the field follows the first dot.

    Returns ``(None, None)`` for names without a dot in their base name.
    """
    match = _NAME_RE.match(name)
    if match is None:
        return None, None
    return match.group(1), match.group(2)


def media_kind(name: str) -> str | None:
    """``"image"`` / ``"video"`` / ``"audio"`` from the last extension of ``name``, else None.

    A features member ``X.EXT.safetensors`` (see :func:`is_features`) has the kind of ``X.EXT``
    when that is a video; cached features exist for videos only.
    """
    stem, _, ext = name.lower().rpartition(".")
    if ext == FEATURES_EXTENSION:
        return "video" if stem.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS else None
    for kind, exts in MEDIA_KINDS.items():
        if ext in exts:
            return kind
    return None


def is_features(name: str) -> bool:
    """Whether ``name`` is a features member (cached frame tokens of a video), not the medium itself."""
    return name.lower().rsplit(".", 1)[-1] == FEATURES_EXTENSION and media_kind(name) is not None


def check_messages(messages: Any) -> list[tuple[str, str]]:
    """Validate Llama 3 chat messages and return their media references in order.

    Args:
        messages: the list to check.

    Returns:
        ``[(kind, value), ...]`` for every media part, in order of appearance.

    Raises:
        SampleError: reason ``"bad messages"`` with a message naming the message / part at fault.
    """
    if not isinstance(messages, list) or not messages:
        raise SampleError("bad messages", "'messages' must be a non-empty list")
    refs: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise SampleError("bad messages", f"message {i} is a {type(message).__name__}, not an object")
        if message.get("role") not in ROLES:
            raise SampleError(
                "bad messages", f"message {i} has role {message.get('role')!r}, not one of {ROLES}"
            )
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise SampleError("bad messages", f"message {i}: content must be a string or a list of parts")
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise SampleError("bad messages", f"message {i}, part {k}: 'text' must be a string")
            elif kind in MEDIA_KINDS:
                if not isinstance(part.get(kind), str) or not part[kind]:
                    raise SampleError(
                        "bad messages",
                        f"message {i}, part {k}: a {kind} part needs a non-empty string {kind!r}",
                    )
                refs.append((kind, part[kind]))
            else:
                raise SampleError(
                    "bad messages",
                    f"message {i}, part {k}: part type {kind!r} is not one of 'text', {', '.join(MEDIA_KINDS)}",
                )
    return refs


def caption_messages(kind: str, field: str, caption: str, prompt: str) -> list[dict[str, Any]]:
    """The messages of a caption pair: user [media, prompt], assistant caption."""
    return [
        {"role": "user", "content": [{"type": kind, kind: field}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": caption},
    ]


def rewrite_media(messages: list[dict[str, Any]], mapping: Mapping[str, str]) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose media part values are replaced through ``mapping``."""
    out = copy.deepcopy(messages)
    for message in out:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] in MEDIA_KINDS:
                    part[part["type"]] = mapping[part[part["type"]]]
    return out


def parse_size(text: str | int) -> int:
    """Parse a human-readable size: ``"64MB"`` (10**6), ``"64MiB"`` / ``"64M"`` (2**20), ``"1.5GB"``, ``"4096"``.

    Raises:
        ValueError: the text is not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", str(text), flags=re.IGNORECASE)
        if match is None or (match.group(3) and not match.group(2)):
            raise ValueError(f"cannot read size {text!r}; use e.g. 64MB, 512MiB, 1.5GB or a byte count")
        number, prefix, binary, unit_b = match.groups()
        power = " kmgt".index(prefix.lower()) if prefix else 0
        # "KB/MB/GB" are decimal; "KiB/MiB" and the bare "K/M/G" of many command-line tools are binary.
        base = 1000 if (prefix and unit_b and not binary) else 1024
        value = int(float(number) * base**power)
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Member:
    field: str
    data: bytes | None = None  # inline member (the json)
    path: Path | None = None  # or a file copied byte for byte


@dataclass(frozen=True)
class _Plan:
    key: str
    members: tuple[_Member, ...]
    origin: str  # where it came from, for error messages


def _json_member(obj: Mapping[str, Any]) -> _Member:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return _Member(field="json", data=text.encode("utf-8"))


def _check_key(key: Any, origin: str) -> str:
    if not isinstance(key, str) or not key:
        raise PackError(f"{origin}: 'key' must be a non-empty string")
    base = key.rsplit("/", 1)[-1]
    if "." in base or not base or key.startswith("/") or ".." in key.split("/") or "\\" in key:
        raise PackError(f"{origin}: key {key!r} must be a relative name without dots in its last part")
    return key


def _caption_json(
    kind: str, field: str, caption: Any, prompt: Any, meta: Any, caption_prompt: str | None, origin: str
) -> dict[str, Any]:
    if not isinstance(caption, str):
        raise PackError(f"{origin}: 'caption' must be a string")
    if prompt is not None and not isinstance(prompt, str):
        raise PackError(f"{origin}: 'prompt' must be a string")
    if caption_prompt is not None:
        obj: dict[str, Any] = {"messages": caption_messages(kind, field, caption, prompt or caption_prompt)}
    else:
        obj = {"caption": caption}
        if prompt is not None:
            obj["prompt"] = prompt
    if meta is not None:
        obj["meta"] = meta
    return obj


def _plan_manifest(path: Path, caption_prompt: str | None) -> Iterator[_Plan]:
    root = path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PackError(f"cannot read manifest {path}: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        origin = f"{path.name} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PackError(f"{origin}: invalid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise PackError(f"{origin}: expected a JSON object, got {type(row).__name__}")
        key = _check_key(row["key"], origin) if "key" in row else f"{lineno:09d}"

        def resolve(value: str, kind: str, origin: str = origin) -> Path:
            file = Path(value) if os.path.isabs(value) else root / value
            if media_kind(file.name) != kind:
                exts = " ".join(sorted(MEDIA_KINDS[kind]))
                raise PackError(f"{origin}: {kind} {value!r} does not end in one of: {exts}")
            if not file.is_file():
                raise PackError(f"{origin}: {kind} file {value!r} not found (looked for {file})")
            return file

        if "messages" in row:
            unknown = set(row) - _MESSAGE_KEYS
            if unknown:
                raise PackError(f"{origin}: unknown keys {sorted(unknown)}; allowed: {sorted(_MESSAGE_KEYS)}")
            try:
                refs = check_messages(row["messages"])
            except SampleError as exc:
                raise PackError(f"{origin}: {exc}") from exc
            mapping: dict[str, str] = {}
            members: list[_Member] = []
            for kind, value in refs:
                if value in mapping:
                    continue
                file = resolve(value, kind)
                mapping[value] = f"{len(members)}.{file.name.rsplit('.', 1)[-1].lower()}"
                members.append(_Member(field=mapping[value], path=file))
            obj: dict[str, Any] = {"messages": rewrite_media(row["messages"], mapping)}
            if "meta" in row:
                obj["meta"] = row["meta"]
            yield _Plan(key, (_json_member(obj), *members), origin)
            continue
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
        file = resolve(row[kind], kind)
        field = file.name.rsplit(".", 1)[-1].lower()
        obj = _caption_json(
            kind, field, row["caption"], row.get("prompt"), row.get("meta"), caption_prompt, origin
        )
        yield _Plan(key, (_json_member(obj), _Member(field=field, path=file)), origin)


def _plan_folder(src: Path, caption_prompt: str | None, exclude: Path) -> Iterator[_Plan]:
    groups: dict[str, dict[str, Path]] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != exclude)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = (here / name).relative_to(src).as_posix()
            key, field = split_member_name(rel)
            if key is None or field is None:
                raise PackError(f"{rel}: a file name needs an extension (e.g. {name}.jpg)")
            field = field.lower()
            ext = field.rsplit(".", 1)[-1]
            if ext not in TEXT_FIELDS and media_kind(field) is None:
                allowed = " ".join(sorted(TEXT_FIELDS.union(*MEDIA_KINDS.values())))
                raise PackError(f"{rel}: unknown extension {'.' + ext!r}; allowed: {allowed}")
            if ext in TEXT_FIELDS and field != ext:
                raise PackError(f"{rel}: expected {key}.{ext}, one text file per sample")
            group = groups.setdefault(key, {})
            if field in group:
                raise PackError(f"{rel}: clashes with {group[field].relative_to(src).as_posix()}")
            group[field] = here / name
    for key in sorted(groups):
        files = groups[key]
        origin = f"{key}.*"
        media = {f: p for f, p in sorted(files.items()) if f not in TEXT_FIELDS}
        members = [_Member(field=f, path=p) for f, p in media.items()]
        if "json" in files:
            origin = files["json"].relative_to(src).as_posix()
            if "txt" in files:
                raise PackError(f"{origin}: has both a .json and a .txt; keep one")
            try:
                row = json.loads(files["json"].read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise PackError(f"{origin}: invalid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise PackError(f"{origin}: expected a JSON object")
            if "messages" in row:
                unknown = set(row) - {"messages", "meta"}
                if unknown:
                    raise PackError(f"{origin}: unknown keys {sorted(unknown)}")
                try:
                    refs = check_messages(row["messages"])
                except SampleError as exc:
                    raise PackError(f"{origin}: {exc}") from exc
                by_name = {**{p.name.lower(): f for f, p in media.items()}, **{f: f for f in media}}
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
                    raise PackError(
                        f"{origin}: media {[media[f].name for f in unused]} not used by any message"
                    )
                obj: dict[str, Any] = {"messages": rewrite_media(row["messages"], mapping)}
                if "meta" in row:
                    obj["meta"] = row["meta"]
                yield _Plan(key, (_json_member(obj), *members), origin)
                continue
            if "caption" not in row:
                raise PackError(f"{origin}: needs 'messages' or 'caption'")
            unknown = set(row) - {"caption", "prompt", "meta"}
            if unknown:
                raise PackError(f"{origin}: unknown keys {sorted(unknown)}")
            caption, prompt, meta = row["caption"], row.get("prompt"), row.get("meta")
        elif "txt" in files:
            origin = files["txt"].relative_to(src).as_posix()
            try:
                caption = files["txt"].read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise PackError(f"{origin}: cannot read caption ({exc})") from exc
            prompt = meta = None
        else:
            raise PackError(f"{origin}: media without {key}.json or {key}.txt")
        if len(media) != 1:
            raise PackError(f"{origin}: a caption needs exactly one media file, found {len(media)}")
        (field,) = media
        obj = _caption_json(media_kind(field) or "", field, caption, prompt, meta, caption_prompt, origin)
        yield _Plan(key, (_json_member(obj), *members), origin)


# --------------------------------------------------------------------------- writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with the fixed metadata :func:`pack` writes (mode, time, owners), so the
    same content always gives the same bytes."""
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def publish_shards(
    tmp: Path, out: Path, manifest: Mapping[str, Any], *, replace: Sequence[Path] = ()
) -> None:
    """Move the shards ``manifest["shards"]`` names from ``tmp`` into ``out`` (first deleting
    ``replace``, an earlier output), then write ``out/manifest.json`` last: a folder with a manifest
    is complete."""
    for path in replace:
        path.unlink()
    for shard in manifest["shards"]:
        os.replace(tmp / shard["name"], out / shard["name"])
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp / "manifest.json", out / "manifest.json")


def discard_shards(tmp: Path, out: Path, shards: Sequence[Mapping[str, Any]], *, remove_out: bool) -> None:
    """Undo a failed :func:`publish_shards`: delete the shards already moved into ``out``, the
    staging folder ``tmp``, and ``out`` itself when ``remove_out`` and nothing else is in it."""
    for shard in shards:  # a failure while moving may have placed some already
        if (out / shard["name"]).exists() and not (tmp / shard["name"]).exists():
            (out / shard["name"]).unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    if remove_out and not any(out.iterdir()):
        out.rmdir()


def _padded(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def _member_size(plan: _Plan, member: _Member) -> int:
    if member.data is not None:
        return len(member.data)
    assert member.path is not None
    try:
        return member.path.stat().st_size
    except OSError as exc:
        raise PackError(f"{plan.origin}: cannot read {member.path} ({exc})") from exc


def _sample_bytes(plan: _Plan) -> int:
    """Bytes the sample's members take in a tar."""
    infos = [_tarinfo(f"{plan.key}.{m.field}", _member_size(plan, m)) for m in plan.members]
    return sum(_entry_bytes(info) for info in infos)


def _write_sample(tar: tarfile.TarFile, plan: _Plan) -> None:
    for member in plan.members:
        size = _member_size(plan, member)
        if member.data is not None:
            data = member.data
        else:
            assert member.path is not None
            try:
                data = member.path.read_bytes()
            except OSError as exc:
                raise PackError(f"{plan.origin}: cannot read {member.path} ({exc})") from exc
            if len(data) != size:
                raise PackError(f"{plan.origin}: {member.path} changed while packing")
        tar.addfile(_tarinfo(f"{plan.key}.{member.field}", size), io.BytesIO(data))


def _entry_bytes(info: tarfile.TarInfo) -> int:
    """Exact bytes a member takes in a PAX tar: its header(s) plus padded data."""
    return len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")) + _padded(info.size, _BLOCK)


def _file_bytes(entries: int) -> int:
    """Size of a finished tar file whose members take ``entries`` bytes (end blocks, record padding)."""
    return _padded(entries + 2 * _BLOCK, _RECORD)


def pack(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    prefix: str = "shard",
    caption_prompt: str | None = None,
    overwrite: bool = False,
) -> PackResult:
    """Write webdataset shards from a folder of files or a JSONL manifest.

    Args:
        src: a folder (files grouped by key) or a ``.jsonl`` manifest; see the module docstring.
        out_dir: folder to write ``{prefix}-{i:06d}.tar`` and ``manifest.json`` into (created).
        shard_bytes: target shard size (bytes or a string for :func:`parse_size`). A new shard starts
            when the next sample would push the file past it; a sample larger than that gets a shard
            of its own.
        prefix: shard file name prefix.
        caption_prompt: None stores caption pairs as ``{"caption": ...}`` (readers add their
            default prompt); a string stores them as messages with this user prompt.
        overwrite: replace shards and ``manifest.json`` of an earlier pack in ``out_dir``; without
            it such files are an error, so old and new shards never mix.

    Returns:
        :class:`PackResult`.

    Raises:
        PackError: bad input (missing file, unknown extension, bad JSON, no messages ...), named
            by file or manifest line; nothing is written.
        FileExistsError: ``out_dir`` holds an earlier pack and ``overwrite`` is False.
    """
    src, out = Path(src), Path(out_dir)
    limit = parse_size(shard_bytes)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
        raise PackError(f"prefix {prefix!r} must be a plain file name part (letters, digits, _ . -)")
    if src.is_dir():
        plans = list(_plan_folder(src, caption_prompt, exclude=out.resolve()))
    elif src.is_file():
        plans = list(_plan_manifest(src, caption_prompt))
    else:
        raise PackError(f"source {src} is neither a folder nor a manifest file")
    if not plans:
        raise PackError(f"no samples found in {src}")
    seen: dict[str, str] = {}
    for plan in plans:
        if plan.key in seen:
            raise PackError(f"{plan.origin}: key {plan.key!r} is also used by {seen[plan.key]}")
        seen[plan.key] = plan.origin

    old = sorted(out.glob(f"{prefix}-*.tar")) + (
        [out / "manifest.json"] if (out / "manifest.json").exists() else []
    )
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds a pack ({old[0].name} ...); pass overwrite=True to replace it"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mm-pack-", dir=out))
    shards: list[dict[str, Any]] = []
    try:
        groups: list[list[_Plan]] = []
        used = 0  # bytes taken by the members of the last group
        for plan in plans:
            size = _sample_bytes(plan)
            if not groups or _file_bytes(used + size) > limit:
                groups.append([])
                used = 0
            groups[-1].append(plan)
            used += size
        for i, group in enumerate(groups):
            name = f"{prefix}-{i:06d}.tar"
            with tarfile.open(tmp / name, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for plan in group:
                    _write_sample(tar, plan)
            shards.append({"name": name, "samples": len(group)})
        for shard in shards:
            shard["bytes"] = (tmp / shard["name"]).stat().st_size
        manifest = {
            "format": "mm-webdataset",
            "version": 1,
            "samples": len(plans),
            "shards": shards,
            "settings": {
                "source": str(src),
                "shard_bytes": limit,
                "prefix": prefix,
                "caption_prompt": caption_prompt,
            },
        }
        publish_shards(tmp, out, manifest, replace=old)
    except BaseException:
        discard_shards(tmp, out, shards, remove_out=created)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(s["bytes"] for s in shards)
    logger.info("packed %d samples into %d shards (%d bytes) in %s", len(plans), len(shards), total, out)
    return PackResult(out_dir=out, shards=tuple(s["name"] for s in shards), samples=len(plans), bytes=total)
