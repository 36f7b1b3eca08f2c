"""Reading a pack's input safely: stay inside the source folder, never open anything but a regular file.

:func:`mm.datasets.shards.pack` reads files named by an untrusted folder or manifest. Everything it
reads goes through :class:`SourceFolder`:

* **Confinement.** Each path is resolved (every symbolic link followed, ``..`` collapsed) and must
  lie inside the resolved source folder, unless ``allow_outside`` is set. A link that leads out is
  refused naming the link and its target; a link to another place inside is fine.
* **Regular files only.** The resolved path is ``stat``-ed and anything but a regular file (FIFO,
  socket, device, directory) is refused *before* it is opened, so nothing can block or stream
  forever. The file is then opened with ``O_NOFOLLOW | O_NONBLOCK`` and its descriptor
  ``fstat``-ed again: a file swapped for a link or another file between the check and the open is
  refused too. (Residual race: a *directory* on the path swapped for a link between resolving and
  opening; closing it would take ``openat`` walks.)
* **Walking a folder** lists regular files in a fixed order, skipping hidden names, the output
  folder and directory links that loop back to a directory being walked.

POSIX only (``O_NOFOLLOW``, ``O_NONBLOCK``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["FileRefused", "SourceFile", "SourceFolder", "describe_mode", "open_regular", "read_regular"]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_SPECIAL = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISLNK, "symbolic link"),
)


class FileRefused(ValueError):
    """A path the pack will not read; the message names it and says why."""


def describe_mode(mode: int) -> str:
    """``"FIFO"``, ``"directory"``, ... for a ``st_mode`` that is not a regular file."""
    return next((name for test, name in _SPECIAL if test(mode)), f"file type {stat.S_IFMT(mode):o}")


@dataclass(frozen=True)
class SourceFile:
    """A regular file found inside the source: ``shown`` for messages, ``real`` (resolved) to read."""

    shown: str
    real: Path


@dataclass(frozen=True)
class SourceFolder:
    """The folder a pack may read from.

    Attributes:
        root: the folder, resolved.
        allow_outside: follow links and paths to anywhere (special files are refused regardless).
        label: how messages name the folder (``"the source folder"``, ``"the manifest's folder"``).
    """

    root: Path
    allow_outside: bool = False
    label: str = "the source folder"

    @classmethod
    def at(
        cls, folder: Path, *, allow_outside: bool = False, label: str = "the source folder"
    ) -> SourceFolder:
        return cls(Path(folder).resolve(), allow_outside, label)

    def locate(self, path: Path, shown: str) -> Path:
        """``path`` resolved, checked to exist and to lie inside :attr:`root` (unless allowed).

        Raises:
            FileNotFoundError: nothing is there (a dangling link included).
            FileRefused: it resolves outside the folder, or through a loop of links.
        """
        try:
            real = Path(path).resolve(strict=True)
        except FileNotFoundError:
            raise
        except (RuntimeError, OSError, ValueError) as exc:  # a link loop (RuntimeError before 3.13), a NUL
            raise FileRefused(f"{shown}: cannot resolve ({exc})") from exc
        if self.allow_outside or real == self.root or real.is_relative_to(self.root):
            return real
        link = Path(path)
        if link.is_symlink():
            reason = f"is a symbolic link to {os.readlink(link)}"
            if os.readlink(link) != str(real):
                reason += f" ({real})"
        else:
            reason = f"resolves to {real}"
        raise FileRefused(
            f"{shown} {reason}, outside {self.label} {self.root}; "
            "pass --allow-outside-source (allow_outside_source=True) to read files elsewhere"
        )

    def walk(self, *, exclude: Path, skip_dir: Callable[[str], str | None]) -> Iterator[SourceFile]:
        """Every regular file under :attr:`root` (``shown`` relative, POSIX), in sorted order.

        Hidden names (``.x``) and ``exclude`` (a resolved folder) are skipped. Directory links are
        followed when they stay inside (or ``allow_outside``), except those leading back to a
        directory already being walked (a loop, which would add nothing).

        Args:
            exclude: a resolved folder not to walk (the output folder).
            skip_dir: for a directory's name, a reason to refuse it (e.g. it is named like a
                media file), or None.

        Raises:
            FileRefused: a link leaving the folder, a dangling link, a special file, or a
                directory ``skip_dir`` refuses.
        """
        yield from self._walk(self.root, "", (self.root,), exclude, skip_dir)

    def _walk(
        self,
        real_dir: Path,
        prefix: str,
        chain: tuple[Path, ...],
        exclude: Path,
        skip_dir: Callable[[str], str | None],
    ) -> Iterator[SourceFile]:
        try:
            with os.scandir(real_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise FileRefused(f"{prefix or './'}: cannot list the folder ({exc.strerror})") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            shown = prefix + entry.name
            try:
                real = self.locate(Path(entry.path), shown)
            except FileNotFoundError as exc:
                raise FileRefused(f"{shown} is a dangling symbolic link ({exc.strerror})") from exc
            try:
                mode = os.stat(real).st_mode
            except OSError as exc:
                raise FileRefused(f"{shown}: cannot read ({exc.strerror})") from exc
            if stat.S_ISDIR(mode):
                if real == exclude or real in chain:
                    continue
                reason = skip_dir(entry.name)
                if reason:
                    raise FileRefused(f"{shown} is a directory; {reason}")
                yield from self._walk(real, shown + "/", (*chain, real), exclude, skip_dir)
            elif stat.S_ISREG(mode):
                yield SourceFile(shown, real)
            else:
                raise FileRefused(f"{shown} is not a regular file ({describe_mode(mode)})")


def open_regular(real: Path, shown: str) -> tuple[BinaryIO, os.stat_result]:
    """Open ``real`` (a resolved path) if, and only if, it is a regular file; see the module docstring."""
    try:
        before = os.stat(real)
    except OSError as exc:
        raise FileRefused(f"{shown}: cannot read ({exc.strerror})") from exc
    if not stat.S_ISREG(before.st_mode):
        raise FileRefused(f"{shown} is not a regular file ({describe_mode(before.st_mode)})")
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise FileRefused(f"{shown}: cannot open ({exc.strerror})") from exc
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise FileRefused(f"{shown} was replaced while being opened")
    return os.fdopen(fd, "rb"), after


def read_regular(real: Path, shown: str, *, limit: int, what: str) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes.

    Raises:
        FileRefused: not a regular file, unreadable, or over ``limit`` (``what`` names the limit).
    """
    file, info = open_regular(real, shown)
    with file:
        if info.st_size > limit:
            raise FileRefused(
                f"{shown}: file is {info.st_size} bytes, over the limit of {limit} bytes ({what})"
            )
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise FileRefused(f"{shown}: cannot read ({exc.strerror})") from exc
    if len(data) > limit:
        raise FileRefused(f"{shown}: file grew over the limit of {limit} bytes ({what}) while being read")
    return data
