"""What ``mm eval`` reads a benchmark file into, and the helpers every reader shares.

A reader turns a benchmark's published files into :class:`TaskData`: one :class:`EvalSample` per question
(its id, the Llama 3 chat messages that ask it, the gold answers and what scoring needs besides). Every
record is checked as it is read; a bad one is refused with :class:`EvalDataError`, whose message names the
file and the line (text formats) or the index (JSON and parquet) of the record, e.g.
``val_v1.0.json: data[3] (questionId 49153): 'answers' is missing``.

Nothing here imports torch or decodes media: messages name media by path (or hold the bytes a parquet file
stores), and the model's preprocessor decodes them when the sample is asked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EvalDataError",
    "EvalSample",
    "Record",
    "TaskData",
    "TaskOptions",
    "check_file",
    "find_media_root",
    "load_json",
    "load_records",
    "user_turn",
]


class EvalDataError(ValueError):
    """A benchmark file that cannot be read, or a record in it that is malformed (the message names where)."""


@dataclass(frozen=True)
class EvalSample:
    """One question of a benchmark.

    Attributes:
        id: the benchmark's own id of the question (``question_id``, ``questionId``, ``id``, the utterance
            id...), or ``"<file stem>-<index>"`` where the format has none.
        messages: the Llama 3 chat messages that ask it (media parts name files by path, or hold bytes).
        references: the gold answers (ten human answers for VQAv2/TextVQA, the gold letter for multiple
            choice, the transcript or translation for speech, the gold choice for text).
        extra: what scoring needs besides (``options`` for multiple choice, ``query``/``choices``/``gold``
            for the text task).
        source: where the record stands (``file:line`` or ``file: key[index]``), for error messages.
    """

    id: str | int
    messages: list[dict[str, Any]]
    references: tuple[str, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class TaskData:
    """A benchmark file read: its samples, and how many records were left out on purpose (and why)."""

    samples: list[EvalSample]
    skipped: int = 0
    skipped_reason: str = ""


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """Settings of a reader (``mm eval``'s ``--answers``, ``--split``, ``--media``, ``--prompt``).

    Args:
        answers: a second file the format needs (VQAv2's annotations).
        split: which split of a folder or file to read (VQAv2 ``val2014``, LibriSpeech ``test-clean``,
            MMMU ``validation``, the ``split`` column of a CoVoST 2 TSV).
        media: the folder holding the images, videos or clips (default: the format's usual place).
        prompt: the instruction to use instead of the task's default (see each task).
    """

    answers: str | os.PathLike | None = None
    split: str | None = None
    media: str | os.PathLike | None = None
    prompt: str | None = None

    def refuse(self, task: str, *names: str) -> None:
        """Refuse options that mean nothing for ``task`` (rather than ignore them)."""
        for name in names:
            if getattr(self, name) is not None:
                raise EvalDataError(f"--{name} has no meaning for the task {task!r}")


class Record:
    """A record of a benchmark file with its place, for fields checked with a message naming it.

    Args:
        data: the record (a JSON object, a parquet row, a TSV row).
        where: its place, e.g. ``"questions.json: questions[12]"`` or ``"dev.tsv:7"``.
    """

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise EvalDataError(f"{where}: expected an object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def error(self, message: str) -> EvalDataError:
        return EvalDataError(f"{self.where}: {message}")

    def has(self, name: str) -> bool:
        value = self.data.get(name)
        return value is not None and not (isinstance(value, float) and value != value)  # NaN: pandas' null

    def get(self, *names: str, kind: type | tuple[type, ...] = str, required: bool = True) -> Any:
        """The first of ``names`` present, checked to be of ``kind`` (a ``str`` field must not be empty).

        Raises:
            EvalDataError: none present (when ``required``), or the value is of another type.
        """
        for name in names:
            if self.has(name):
                value = self.data[name]
                if isinstance(value, bool) or not isinstance(value, kind):
                    raise self.error(f"{name!r} must be {_kind_name(kind)}, got {value!r:.80}")
                if isinstance(value, str) and not value.strip():
                    raise self.error(f"{name!r} is empty")
                return value
        if required:
            raise self.error(f"{' or '.join(repr(n) for n in names)} is missing")
        return None

    def strings(self, *names: str, min_len: int = 1) -> list[str]:
        """A list of strings under the first of ``names`` present (at least ``min_len`` of them)."""
        values = self.get(*names, kind=(list, tuple))
        name = next(n for n in names if self.has(n))
        if len(values) < min_len or not all(isinstance(v, str) for v in values):
            raise self.error(f"{name!r} must be a list of at least {min_len} strings, got {values!r:.120}")
        return list(values)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        "str": "a string",
        "int": "an integer",
        "list": "a list",
        "dict": "an object",
        "float": "a number",
    }
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def load_json(path: Path) -> Any:
    """The parsed contents of a JSON file.

    Raises:
        EvalDataError: the file is missing or is not valid JSON (naming its line).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e})") from None


def load_records(path: Path, key: str | None = None) -> list[Record]:
    """The records of a JSON Lines file (one object a line) or of a JSON list (or ``{key: [...]}``).

    Places read ``file:line`` for JSON Lines and ``file: [index]`` (``file: key[index]``) for JSON.

    Raises:
        EvalDataError: an unreadable file, a line that is not JSON, or no list where one is expected.
    """
    if path.suffix == ".jsonl":
        records = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise EvalDataError(f"{path}: no such file") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record(json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        return records
    doc = load_json(path)
    if key is not None and isinstance(doc, Mapping):
        if not isinstance(doc.get(key), list):
            raise EvalDataError(f"{path}: expected a list under {key!r}")
        return [Record(r, f"{path}: {key}[{i}]") for i, r in enumerate(doc[key])]
    if not isinstance(doc, list):
        wanted = f"a list or an object with a {key!r} list" if key else "a list of records"
        raise EvalDataError(f"{path}: expected {wanted}, got {type(doc).__name__}")
    return [Record(r, f"{path}: [{i}]") for i, r in enumerate(doc)]


def find_media_root(
    given: str | os.PathLike | None, candidates: Iterable[Path], probe: str | None, what: str
) -> Path:
    """The folder holding a benchmark's media: ``given`` (``--media``), else the first candidate that holds
    ``probe`` (the first sample's file), else the first candidate that exists.

    Raises:
        EvalDataError: ``given`` is not a folder, or no candidate holds the media.
    """
    if given is not None:
        root = Path(given)
        if not root.is_dir():
            raise EvalDataError(f"--media {root}: no such folder")
        return root
    candidates = list(dict.fromkeys(candidates))
    for root in candidates:
        if root.is_dir() and (probe is None or (root / probe).exists()):
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise EvalDataError(f"cannot find the {what} (looked in {tried}); name the folder with --media")


def check_file(record: Record, path: Path) -> str:
    """``path`` as a string, after checking that the file exists (else an error naming the record)."""
    if not path.is_file():
        raise record.error(f"no such file {path}")
    return str(path)


def user_turn(media: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """One user message: the media parts first (where Llama 3.2 Vision's text attends to them), then the text."""
    return [{"role": "user", "content": [*media, {"type": "text", "text": text}]}]
