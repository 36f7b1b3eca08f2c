"""Reading a media file named by a path: refuse what is not one before anything opens it.

``load_image``, ``load_audio`` and ``load_video`` all take paths (from ``mm ask``, a manifest, or
the server's ``allow_paths``). Each path is checked from ``stat`` first, so a folder, a FIFO, a
socket or a device is refused without being opened (opening a FIFO for reading blocks until a
writer comes), an empty file is named as empty instead of surfacing as a decoder's "Invalid
argument", and an oversized one is refused before a byte is read. Every error names the file.
"""

from __future__ import annotations

import os
import stat

__all__ = ["check_media_path", "read_media_file"]


def check_media_path(
    path: str | os.PathLike,
    *,
    kind: str,
    error: type[Exception],
    max_bytes: int | None = None,
    missing: type[Exception] = FileNotFoundError,
) -> int:
    """Check that ``path`` is a readable, non-empty regular file within ``max_bytes``; return its size.

    Args:
        path: the file.
        kind: what it should hold ("image", "audio", "video"), for the messages.
        error: the exception raised for a file that is not usable.
        max_bytes: the largest accepted size (``None``: no cap).
        missing: the exception raised when nothing is at ``path``.
    """
    name = os.fspath(path)
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise missing(f"{kind} file {name!r}: no such file") from None
    except OSError as err:
        raise error(f"{kind} file {name!r}: cannot be read ({err.strerror or err})") from None
    return _check_stat(name, info, kind=kind, error=error, max_bytes=max_bytes)


def read_media_file(
    path: str | os.PathLike,
    *,
    kind: str,
    error: type[Exception],
    max_bytes: int | None = None,
    missing: type[Exception] = FileNotFoundError,
) -> bytes:
    """:func:`check_media_path`, then the file's bytes (opened without blocking, checked again once open)."""
    name = os.fspath(path)
    check_media_path(name, kind=kind, error=error, max_bytes=max_bytes, missing=missing)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise error(f"{kind} file {name!r}: cannot be opened ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as file:
        _check_stat(name, os.fstat(fd), kind=kind, error=error, max_bytes=max_bytes)  # swapped since?
        data = file.read(-1 if max_bytes is None else max_bytes + 1)
    if not data:
        raise error(f"{kind} file {name!r}: empty file (0 bytes), there is no {kind} data")
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{kind} file {name!r}: over max_bytes={max_bytes}")
    return data


def _check_stat(
    name: str, info: os.stat_result, *, kind: str, error: type[Exception], max_bytes: int | None
) -> int:
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{kind} file {name!r}: is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise error(
            f"{kind} file {name!r}: not a regular file (a FIFO, socket or device); refused without opening it"
        )
    if info.st_size == 0:
        raise error(f"{kind} file {name!r}: empty file (0 bytes), there is no {kind} data")
    if max_bytes is not None and info.st_size > max_bytes:
        raise error(f"{kind} file {name!r}: {info.st_size} bytes, over max_bytes={max_bytes}")
    return info.st_size
