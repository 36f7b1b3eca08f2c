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

A **preference sample** (post-training, Llama 3 section 7.5: reward modelling and DPO) is a
messages sample whose messages are only the prompt, ending with a user turn, plus ranked answers
(strings)::

      {"messages": [...prompt...], "chosen": "a better answer", "rejected": "a worse answer",
       "edited": "the human-edited answer"}

``chosen`` and ``rejected`` are required, ``edited`` (the paper's human-edited answer) optional;
the ranking is edited > chosen > rejected. Answers are non-blank, distinct, and at most
:data:`MAX_TEXT_BYTES` each. Folders (``KEY.json``) and manifests take them alike
(:data:`~mm.datasets._schema.PREFERENCE_ANSWERS`, :func:`~mm.datasets._schema.check_preference`).

A plain caption pair may instead be ``KEY.json = {"caption": str}`` (optionally ``"prompt": str``)
plus exactly one media member (``KEY.jpg``). Readers turn it into messages: user [media, prompt],
assistant caption, with a default prompt per kind (:data:`DEFAULT_CAPTION_PROMPTS`).

:func:`pack` writes such shards from

* a **folder**: files grouped by key (``foo.jpg`` + ``foo.json`` or ``foo.txt``; several media for
  one key as ``foo.0.png foo.1.png`` + ``foo.json`` whose media parts name ``0.png`` or
  ``foo.0.png``); sub-folders become part of the key; hidden files are ignored; symbolic links
  (to files or folders) are followed while they stay inside the folder;
* a **JSONL manifest**: one sample per line, ``{"messages": [...]}`` whose media parts hold paths
  relative to the manifest's folder (and inside it), or ``{"image" | "video" | "audio": path,
  "caption": str}`` with optional ``"prompt"``; either form may add ``"key"`` (the tar key) and
  ``"meta"``.

The input is untrusted, and every sample is checked before the first byte is written; any problem
aborts the pack with a :class:`PackError` naming the file or manifest line:

* **Nothing outside the source is read** (:mod:`mm.datasets._source_files`): every path is
  resolved and must lie inside the source folder (the manifest's folder); a link leading out, an
  absolute path or a ``..`` escape is refused unless ``allow_outside_source``. Only regular files
  are opened: a FIFO, socket, device or directory named like a media file is refused from its
  ``stat``, so nothing can block.
* **Only what readers can use is packed** (:mod:`mm.datasets._pack_checks`): media decode (images
  fully, videos to their first frame with the whole stream checked for truncation, audio fully);
  captions and texts are non-empty and at most :data:`MAX_TEXT_BYTES`; a sample's JSON is at most
  :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH` levels deep, its ``meta`` at most
  :data:`MAX_META_BYTES`; keys are non-empty, without control characters, and unique after NFC
  normalisation, so no two members share a name.
* **No partial shard survives** (:mod:`mm.datasets._staging`): shards are written into a hidden
  staging folder of this pack inside ``out_dir``, moved into place only when all of them are
  complete, and ``manifest.json`` is written last (an earlier one is removed first when
  overwriting). A failure removes the staging folder; a pack that was killed leaves it behind,
  and the next pack into the same folder removes it. A file that changes between its check and
  its copy aborts the pack.

Member order, names, modes and times are fixed, so packing the same input twice gives identical
bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mm.datasets._pack_checks import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_KEY_BYTES,
    MAX_MEDIA_BYTES,
    MAX_META_BYTES,
    MAX_TEXT_BYTES,
    check_field,
    check_medium,
    check_message_texts,
    check_meta,
    parse_json,
)
from mm.datasets._pack_plan import Member, Plan, hasher, plan_source
from mm.datasets._schema import (
    AUDIO_EXTENSIONS,
    DEFAULT_CAPTION_PROMPTS,
    FEATURES_EXTENSION,
    IMAGE_EXTENSIONS,
    MEDIA_KINDS,
    PICKLE_EXTENSIONS,
    TEXT_FIELDS,
    VIDEO_EXTENSIONS,
    PackError,
    SampleError,
    caption_messages,
    check_messages,
    is_features,
    media_kind,
    rewrite_media,
    split_member_name,
)
from mm.datasets._source_files import FileRefused, SourceFile, SourceFolder, open_regular, read_regular
from mm.datasets._staging import staging_folder

if TYPE_CHECKING:
    from collections.abc import Iterable

    from mm.datasets.importers import ImportedSample

__all__ = [
    "AUDIO_EXTENSIONS",
    "DEFAULT_CAPTION_PROMPTS",
    "DEFAULT_SHARD_BYTES",
    "FEATURES_EXTENSION",
    "IMAGE_EXTENSIONS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_KEY_BYTES",
    "MAX_MEDIA_BYTES",
    "MAX_META_BYTES",
    "MAX_TEXT_BYTES",
    "MEDIA_KINDS",
    "PICKLE_EXTENSIONS",
    "PackError",
    "PackResult",
    "SampleError",
    "TEXT_FIELDS",
    "VIDEO_EXTENSIONS",
    "add_member",
    "caption_messages",
    "check_messages",
    "discard_shards",
    "is_features",
    "media_kind",
    "pack",
    "pack_samples",
    "parse_size",
    "publish_shards",
    "rewrite_media",
    "split_member_name",
]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 64 * 1024**2
_MTIME = 0  # fixed member time: packing twice gives identical bytes
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


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
    for path in sorted(replace, key=lambda p: p.name != "manifest.json"):  # the manifest first:
        path.unlink()  # from here on the folder no longer claims to hold a complete pack
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


def _member_size(member: Member) -> int:
    return len(member.data) if member.data is not None else member.size


def _sample_bytes(plan: Plan) -> int:
    """Bytes the sample's members take in a tar."""
    infos = [_tarinfo(f"{plan.key}.{m.field}", _member_size(m)) for m in plan.members]
    return sum(_entry_bytes(info) for info in infos)


class _HashingReader:
    """A file's ``read`` that also feeds a digest, so what went into the tar can be compared."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.hash = file, hasher()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.hash.update(data)
        return data


def _write_sample(tar: tarfile.TarFile, plan: Plan) -> None:
    for member in plan.members:
        info = _tarinfo(f"{plan.key}.{member.field}", _member_size(member))
        if member.data is not None:
            tar.addfile(info, io.BytesIO(member.data))
            continue
        assert member.file is not None
        changed = PackError(f"{plan.origin}: {member.file.shown} changed while packing")
        try:
            file, stat = open_regular(member.file.real, member.file.shown)
        except FileRefused as exc:
            raise PackError(f"{plan.origin}: {exc}") from exc
        with file:
            if stat.st_size != member.size:
                raise changed
            reader = _HashingReader(file)
            try:
                tar.addfile(info, reader)
            except OSError as exc:
                raise changed from exc
        if reader.hash.digest() != member.digest:
            raise changed


def _entry_bytes(info: tarfile.TarInfo) -> int:
    """Exact bytes a member takes in a PAX tar: its header(s) plus padded data."""
    return len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")) + _padded(info.size, _BLOCK)


def _file_bytes(entries: int) -> int:
    """Size of a finished tar file whose members take ``entries`` bytes (end blocks, record padding)."""
    return _padded(entries + 2 * _BLOCK, _RECORD)


def _earlier_pack(out: Path, prefix: str, overwrite: bool) -> list[Path]:
    """The shards and manifest of an earlier pack in ``out``: replaced only with ``overwrite``."""
    old = sorted(out.glob(f"{prefix}-*.tar")) + (
        [out / "manifest.json"] if (out / "manifest.json").exists() else []
    )
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds a pack ({old[0].name} ...); pass overwrite=True to replace it"
        )
    return old


def _group(plans: Sequence[Plan], limit: int) -> list[list[Plan]]:
    """Samples in shards: a new shard starts when the next sample would push the file past ``limit``."""
    groups: list[list[Plan]] = []
    used = 0  # bytes taken by the members of the last group
    for plan in plans:
        size = _sample_bytes(plan)
        if not groups or _file_bytes(used + size) > limit:
            groups.append([])
            used = 0
        groups[-1].append(plan)
        used += size
    return groups


def _write_shards(tmp: Path, groups: Sequence[Sequence[Plan]], prefix: str) -> list[dict[str, Any]]:
    shards: list[dict[str, Any]] = []
    for i, group in enumerate(groups):
        name = f"{prefix}-{i:06d}.tar"
        with tarfile.open(tmp / name, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for plan in group:
                _write_sample(tar, plan)
        shards.append({"name": name, "samples": len(group), "bytes": (tmp / name).stat().st_size})
    return shards


def _pack_manifest(
    plans: Sequence[Plan],
    shards: list[dict[str, Any]],
    source: str | None,
    limit: int,
    prefix: str,
    caption_prompt: str | None,
) -> dict[str, Any]:
    """``manifest.json`` of a pack: the shards written and the settings that wrote them."""
    settings = {"source": source, "shard_bytes": limit, "prefix": prefix, "caption_prompt": caption_prompt}
    return {
        "format": "mm-webdataset",
        "version": 1,
        "samples": len(plans),
        "shards": shards,
        "settings": settings,
    }


def pack(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    prefix: str = "shard",
    caption_prompt: str | None = None,
    overwrite: bool = False,
    allow_outside_source: bool = False,
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
        allow_outside_source: read files outside the source folder (the manifest's folder): links
            that lead out, and absolute or ``..`` paths in a manifest. Special files (FIFOs,
            devices, ...) are refused regardless.

    Returns:
        :class:`PackResult`.

    Raises:
        PackError: bad input (a file outside the source or not a regular file, media that do not
            decode, a missing file, an unknown extension, bad JSON, no messages, a text, key or
            JSON over its limit ...), named by file or manifest line; nothing is written.
        FileExistsError: ``out_dir`` holds an earlier pack and ``overwrite`` is False.
    """
    src, out = Path(src), Path(out_dir)
    limit = parse_size(shard_bytes)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
        raise PackError(f"prefix {prefix!r} must be a plain file name part (letters, digits, _ . -)")
    plans = plan_source(src, out, caption_prompt, allow_outside_source)
    old = _earlier_pack(out, prefix, overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    with staging_folder(out) as tmp:
        try:
            shards = _write_shards(tmp, _group(plans, limit), prefix)
            manifest = _pack_manifest(plans, shards, str(src), limit, prefix, caption_prompt)
            publish_shards(tmp, out, manifest, replace=old)
        except BaseException:
            discard_shards(tmp, out, shards, remove_out=created)
            raise
    total = sum(s["bytes"] for s in shards)
    logger.info("packed %d samples into %d shards (%d bytes) in %s", len(plans), len(shards), total, out)
    return PackResult(out_dir=out, shards=tuple(s["name"] for s in shards), samples=len(plans), bytes=total)


# --------------------------------------------------------------------------- imported samples


def _imported_plan(
    sample: ImportedSample, key: str, tmp: Path, folders: dict[Path, SourceFolder], allow_outside: bool
) -> Plan:
    """One importer's sample checked as :func:`pack` checks a manifest line; its in-memory media are
    written into the staging folder ``tmp`` (so memory stays flat) and copied from there."""
    from mm.datasets.importers import MediaFile

    origin = sample.origin
    try:
        refs = check_messages(sample.messages)
        check_message_texts(sample.messages)
        if sample.meta is not None:
            check_meta(sample.meta)
    except ValueError as exc:
        raise PackError(f"{origin}: {exc}") from exc
    used = {value for _, value in refs}
    for kind, value in refs:
        if value not in sample.media or media_kind(value) != kind:
            raise PackError(f"{origin}: {kind} part {value!r} names no {kind} of the sample")
    if set(sample.media) - used:
        raise PackError(f"{origin}: media {sorted(set(sample.media) - used)} not used by any message")
    obj: dict[str, Any] = {"messages": sample.messages}
    if sample.meta is not None:
        obj["meta"] = sample.meta
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        parse_json(text)  # the limits on a sample's JSON (size, depth)
    except ValueError as exc:
        raise PackError(f"{origin}: {exc}") from exc
    members = [Member(field="json", data=text.encode("utf-8"))]
    for field, source in sample.media.items():
        try:
            check_field(field)
        except ValueError as exc:
            raise PackError(f"{origin}: {exc}") from exc
        if isinstance(source, MediaFile):
            folder = folders.setdefault(
                source.root, SourceFolder.at(source.root, allow_outside=allow_outside)
            )
            shown = f"{media_kind(field)} {source.path!r}"
            if os.path.isabs(source.path) and not allow_outside:
                raise PackError(
                    f"{origin}: {shown} is an absolute path; paths are relative to {folder.root} "
                    "(pass --allow-outside-source / allow_outside_source=True to allow others)"
                )
            try:
                file = SourceFile(shown, folder.locate(folder.root / source.path, shown))
                data = read_regular(file.real, shown, limit=MAX_MEDIA_BYTES, what="MAX_MEDIA_BYTES")
            except FileNotFoundError:
                raise PackError(f"{origin}: {shown} not found (looked in {folder.root})") from None
            except FileRefused as exc:
                raise PackError(f"{origin}: {exc}") from exc
        else:
            data = bytes(source)
            if len(data) > MAX_MEDIA_BYTES:
                raise PackError(f"{origin}: {field} is larger than {MAX_MEDIA_BYTES} bytes (MAX_MEDIA_BYTES)")
            spill = tmp / "media" / f"{key}.{field}"
            spill.parent.mkdir(exist_ok=True)
            spill.write_bytes(data)
            file = SourceFile(f"{media_kind(field)} {field}", spill)
        try:
            check_medium(data, media_kind(field) or "", field)
        except ValueError as exc:
            raise PackError(f"{origin}: {file.shown}: {exc}") from exc
        members.append(Member(field=field, file=file, size=len(data), digest=hasher(data).digest()))
    return Plan(key, tuple(members), origin)


def pack_samples(
    samples: Iterable[ImportedSample],
    out_dir: str | os.PathLike[str],
    *,
    shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    prefix: str = "shard",
    overwrite: bool = False,
    allow_outside_source: bool = False,
    source: str = "",
) -> PackResult:
    """Write webdataset shards from an importer's samples (:mod:`mm.datasets.importers`).

    Every sample passes the checks :func:`pack` applies to a manifest line (messages, texts,
    ``meta``, JSON limits, media inside their source folder, regular files, decoding) before the
    first shard is written, and shards are published as :func:`pack` publishes them: on any error
    (a bad record the importer refuses included) nothing is left in ``out_dir``. Keys are the
    samples' positions (``000000000``, ``000000001`` ...); media members are ``0.jpg``, ``1.flac``
    ... as the importer named them. Media given as bytes are staged on disk inside ``out_dir``'s
    staging folder while the pack runs.

    Args:
        samples: the importer's samples, in order.
        out_dir, shard_bytes, prefix, overwrite, allow_outside_source: as :func:`pack`.
        source: how ``manifest.json`` names the source (e.g. ``"llava:train.json"``).

    Raises:
        PackError: a sample that fails a check, named by its origin (file and record / line / row).
        FileExistsError: ``out_dir`` holds an earlier pack and ``overwrite`` is False.
    """
    out = Path(out_dir)
    limit = parse_size(shard_bytes)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
        raise PackError(f"prefix {prefix!r} must be a plain file name part (letters, digits, _ . -)")
    old = _earlier_pack(out, prefix, overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    plans: list[Plan] = []
    try:
        with staging_folder(out) as tmp:
            try:
                folders: dict[Path, SourceFolder] = {}
                for i, sample in enumerate(samples):
                    plans.append(_imported_plan(sample, f"{i:09d}", tmp, folders, allow_outside_source))
                if not plans:
                    raise PackError(f"no samples found in {source or 'the input'}")
                shards = _write_shards(tmp, _group(plans, limit), prefix)
                manifest = _pack_manifest(plans, shards, source, limit, prefix, None)
                publish_shards(tmp, out, manifest, replace=old)
            except BaseException:
                discard_shards(tmp, out, shards, remove_out=False)
                raise
    except BaseException:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    total = sum(s["bytes"] for s in shards)
    logger.info("packed %d samples into %d shards (%d bytes) in %s", len(plans), len(shards), total, out)
    return PackResult(out_dir=out, shards=tuple(s["name"] for s in shards), samples=len(plans), bytes=total)
