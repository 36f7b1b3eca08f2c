"""The hidden folder a pack writes its shards into before publishing them.

Each pack works in its own folder ``OUT/.mm-pack-staging-<16 hex digits>`` holding a lock file
(``.mm-pack-lock``) that the pack keeps ``flock``-ed while it runs. The folder is removed when the
pack ends, however it ends, short of the process being killed (SIGKILL, power loss). The kernel
drops the lock of a killed process, so the next pack into the same ``OUT`` can tell such a stale
folder from the folder of a pack still running, and removes it before it starts. Only folders of
exactly this name pattern holding the lock file are touched (and a folder of this pattern that
lost the race before its lock file was made, once a minute old): a user's ``.mm-pack-notes`` stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["STAGING_PREFIX", "remove_stale_staging", "staging_folder"]

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".mm-pack-staging-"
_LOCK = ".mm-pack-lock"
_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[0-9a-f]{16}")
# A folder without its lock file is either being set up this instant or was killed between its
# mkdir and the lock file's creation; after this long it is the latter.
_UNLOCKED_GRACE_S = 60.0


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A new, locked staging folder inside ``out`` (which must exist), removed when the block ends.

    Stale staging folders of killed packs are removed first (:func:`remove_stale_staging`).
    """
    remove_stale_staging(out)
    tmp = out / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    tmp.mkdir(mode=0o700)
    fd = -1
    try:
        fd = os.open(tmp / _LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # before the lock goes: no one else removes it meanwhile
        if fd >= 0:
            os.close(fd)


def remove_stale_staging(out: Path) -> list[str]:
    """Remove the staging folders in ``out`` whose pack is gone (their lock is free); return their names."""
    removed: list[str] = []
    if not out.is_dir():
        return removed
    with os.scandir(out) as it:
        candidates = [e for e in it if _NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    for entry in candidates:
        path = Path(entry.path)
        try:
            fd = os.open(path / _LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > _UNLOCKED_GRACE_S:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(entry.name)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a pack is writing there right now
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(entry.name)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d stale staging folder(s) of interrupted packs in %s", len(removed), out)
    return removed
