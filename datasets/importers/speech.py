"""Speech recognition and translation sets (``--from librispeech``, ``commonvoice``, ``covost``).

Each utterance becomes one sample: a user turn [audio, prompt] and the transcript (recognition)
or translation as the assistant's answer. The prompts are those ``mm eval asr`` / ``ast`` use:
:data:`ASR_PROMPT` ("Repeat after me in English.") and :data:`AST_PROMPT` ("Translate the
following sentence into English."); ``prompt=`` replaces them.

* **LibriSpeech**: the folder layout ``SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` whose lines
  are ``UTTERANCE-ID TRANSCRIPT``, beside ``UTTERANCE-ID.flac``. ``src`` is any folder above the
  transcripts (``LibriSpeech/`` or ``LibriSpeech/dev-clean/``); errors name ``FILE line n``.
* **Common Voice**: a language folder (``cv-corpus-*/en/``) holding ``SPLIT.tsv`` (``train``,
  ``dev``, ``test``, ``validated`` ...) with a header and the columns ``path`` and ``sentence``,
  and the clips in ``clips/``. ``src`` is that folder (``split`` picks the TSV, default
  ``train``) or the TSV itself; errors name ``SPLIT.tsv line n`` (the header is line 1).
* **CoVoST 2**: ``covost_v2.SRC_TGT.SPLIT.tsv`` with the columns ``path``, ``sentence``,
  ``translation`` (and ``client_id``), over Common Voice clips. ``src`` is the TSV (or a folder
  with exactly one ``*.SPLIT.tsv``); the clips folder is ``media_root`` (default: ``clips/``
  beside the TSV). The target language of the file name sets the prompt's language.

Fields are tab-separated with no quoting, as these sets are published (their texts hold quotes).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

from mm.datasets._schema import PackError
from mm.datasets.importers._records import ImportedSample, MediaFile, MediaList

__all__ = ["ASR_PROMPT", "AST_PROMPT", "read_commonvoice", "read_covost", "read_librispeech"]

ASR_PROMPT = "Repeat after me in English."
AST_PROMPT = "Translate the following sentence into English."
# CoVoST 2's target languages (English into these, and these into English).
_LANGUAGES = {
    "ar": "Arabic", "ca": "Catalan", "cy": "Welsh", "de": "German", "en": "English", "es": "Spanish",
    "et": "Estonian", "fa": "Persian", "fr": "French", "id": "Indonesian", "it": "Italian",
    "ja": "Japanese", "lv": "Latvian", "mn": "Mongolian", "nl": "Dutch", "pt": "Portuguese",
    "ru": "Russian", "sl": "Slovenian", "sv": "Swedish", "ta": "Tamil", "tr": "Turkish", "zh": "Chinese",
}  # fmt: skip


def _sample(root: Path, path: str, prompt: str, answer: str, origin: str, meta: dict) -> ImportedSample:
    media = MediaList()
    audio = media.add("audio", MediaFile(root, path), path, origin)
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": answer},
    ]
    return ImportedSample(messages, media.items, origin, meta)


def read_librispeech(src: str | os.PathLike[str], *, prompt: str = ASR_PROMPT) -> Iterator[ImportedSample]:
    """Samples of a LibriSpeech folder (see the module docstring), transcripts in sorted path order."""
    root = Path(src)
    if not root.is_dir():
        raise PackError(f"{root}: expected the LibriSpeech folder")
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise PackError(f"{root}: no *.trans.txt files")
    for trans in transcripts:
        rel = trans.relative_to(root).as_posix()
        folder = trans.parent.relative_to(root).as_posix()
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            origin = f"{rel} line {lineno}"
            utt, _, text = line.strip().partition(" ")
            if not text.strip():
                raise PackError(f"{origin}: expected 'UTTERANCE-ID TRANSCRIPT'")
            yield _sample(root, f"{folder}/{utt}.flac", prompt, text.strip(), origin, {"id": utt})


def _tsv_rows(path: Path, needed: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """``(origin, row)`` of a header + rows TSV without quoting; the header is line 1."""
    try:
        file = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise PackError(f"cannot read {path}: {exc}") from exc
    with file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        missing = [c for c in needed if header is None or c not in header]
        if missing:
            raise PackError(f"{path.name} line 1: the header lacks column(s) {missing}")
        for row in reader:
            origin = f"{path.name} line {reader.line_num}"
            if not any(row):
                continue
            if len(row) != len(header):
                raise PackError(f"{origin}: {len(row)} fields, the header has {len(header)}")
            yield origin, dict(zip(header, row, strict=True))


def read_commonvoice(
    src: str | os.PathLike[str], *, split: str = "train", prompt: str = ASR_PROMPT
) -> Iterator[ImportedSample]:
    """Samples of a Common Voice language folder or TSV (see the module docstring)."""
    src = Path(src)
    tsv = src / f"{split}.tsv" if src.is_dir() else src
    if not tsv.is_file():
        raise PackError(f"{tsv}: no such TSV (Common Voice's {split}.tsv)")
    clips = tsv.parent / "clips"
    for origin, row in _tsv_rows(tsv, ("path", "sentence")):
        meta = {k: row[k] for k in ("client_id", "locale") if row.get(k)}
        yield _sample(
            clips, row["path"], prompt, row["sentence"].strip(), origin, {"id": row["path"], **meta}
        )


def read_covost(
    src: str | os.PathLike[str],
    *,
    split: str = "train",
    media_root: str | os.PathLike[str] | None = None,
    prompt: str | None = None,
) -> Iterator[ImportedSample]:
    """Samples of a CoVoST 2 TSV (see the module docstring)."""
    src = Path(src)
    if src.is_dir():
        found = sorted(src.glob(f"*.{split}.tsv"))
        if len(found) != 1:
            raise PackError(f"{src}: expected one *.{split}.tsv, found {[p.name for p in found]}")
        src = found[0]
    if not src.is_file():
        raise PackError(f"{src}: no such TSV")
    if prompt is None:
        pair = src.name.split(".")[1] if src.name.count(".") >= 2 else ""
        target = _LANGUAGES.get(pair.rpartition("_")[2])
        prompt = AST_PROMPT if target is None else f"Translate the following sentence into {target}."
    clips = Path(media_root) if media_root is not None else src.parent / "clips"
    for origin, row in _tsv_rows(src, ("path", "sentence", "translation")):
        meta = {"id": row["path"], "sentence": row["sentence"]}
        yield _sample(clips, row["path"], prompt, row["translation"].strip(), origin, meta)
