"""Atomic file and folder writes: a reader never sees a half-written file, a failure leaves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_write_json", "atomic_write_bytes", "remove_atomic_leftovers"]

# What atomic_dir and atomic_write_bytes name their temporary entries: ".NAME.tmp-" + tempfile's
# random letters, digits and underscores.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]+$")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success its files take their place in ``path``.

    A new ``path`` appears at once (one rename). Into an existing folder each file is moved with
    ``os.replace``, so every file is either old or new, never partial. On an exception the
    temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            os.rename(tmp, path)
            return
        for root, _dirs, files in os.walk(tmp):
            dest_root = path / Path(root).relative_to(tmp)
            dest_root.mkdir(parents=True, exist_ok=True)
            for name in files:
                os.replace(Path(root) / name, dest_root / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def remove_atomic_leftovers(
    folder: str | os.PathLike, names: Collection[str] | Callable[[str], bool]
) -> list[Path]:
    """Remove what a killed :func:`atomic_dir` or :func:`atomic_write_bytes` left in ``folder``.

    A kill (not an exception) skips their clean-up and leaves ``.NAME.tmp-XXXXXXXX``. Only such
    entries whose ``NAME`` is one of ``names`` (or for which ``names(NAME)`` is true) are removed:
    never anything else, whatever it is called. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = names if callable(names) else (lambda name: name in names)
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None or not wanted(match["name"]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed
