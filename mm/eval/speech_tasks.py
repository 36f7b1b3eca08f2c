"""Readers of the speech benchmarks: recognition on LibriSpeech folders, translation on CoVoST 2 TSVs.

Each utterance becomes one user turn: the instruction in text, then the audio (the order ``mm demo
--speech`` trains; Llama 3 paper, section 8, prompts recognition and translation the same way):

* **asr**: "Repeat after me in English." — what ``mm demo --speech`` teaches; ``--prompt`` replaces it
  (e.g. the Llama 3 paper's "Repeat after me in English:" style for other models).
* **ast**: "Translate the following sentence into English." — CoVoST 2's usual direction (21 languages
  into English); ``--prompt`` replaces it (e.g. "... into French." for the demo's English->French).

Layouts:

* **LibriSpeech** (Panayotov et al. 2015; openslr.org/12): ``DATA`` is a split folder
  (``LibriSpeech/test-clean``) or the corpus folder with ``--split test-clean``; under it
  ``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` holds lines ``SPEAKER-CHAPTER-UTTERANCE TRANSCRIPT`` and
  the audio is ``SPEAKER-CHAPTER-UTTERANCE.flac`` beside it. Ids are the utterance ids.
* **CoVoST 2** (Wang et al. 2020; ``get_covost_splits.py``'s output, e.g. ``covost_v2.fr_en.test.tsv``):
  a tab-separated file with a header naming at least ``path``, ``sentence`` and ``translation`` (also
  ``client_id`` and, in the un-split release, ``split``: ``--split test`` keeps those rows). The clips are
  Common Voice's, ``--media``, else ``clips/`` beside the file, else its own folder. Ids are the ``path``
  values. Fields are read as written (no quoting: CoVoST's sentences contain quote marks).

Scoring (:mod:`mm.eval.tasks`): corpus WER after Whisper's English normaliser; corpus sacreBLEU.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mm.eval.samples import (
    EvalDataError,
    EvalSample,
    Record,
    TaskData,
    TaskOptions,
    check_file,
    find_media_root,
)

__all__ = ["ASR_PROMPT", "AST_PROMPT", "read_covost", "read_librispeech"]

ASR_PROMPT = "Repeat after me in English."
AST_PROMPT = "Translate the following sentence into English."
_COVOST_COLUMNS = ("path", "sentence", "translation")


def _speech_turn(instruction: str, audio: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": instruction}, {"type": "audio", "audio": audio}],
        }
    ]


def read_librispeech(data: Path, options: TaskOptions) -> TaskData:
    """LibriSpeech: every ``*.trans.txt`` under the split folder, in sorted order; references are transcripts."""
    options.refuse("asr", "answers", "media")
    root = data / options.split if options.split else data
    if not root.is_dir():
        raise EvalDataError(f"{root}: no such folder")
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise EvalDataError(f"{root}: no SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt files")
    instruction = options.prompt or ASR_PROMPT
    samples = []
    for path in transcripts:
        prefix = path.name.removesuffix(".trans.txt")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            utterance, _, text = line.strip().partition(" ")
            if not text.strip():
                raise EvalDataError(f"{where}: expected 'UTTERANCE-ID TRANSCRIPT', got {line!r:.80}")
            if not utterance.startswith(f"{prefix}-"):
                raise EvalDataError(f"{where}: the utterance {utterance!r} is not of {prefix}")
            audio = check_file(Record({}, where), path.parent / f"{utterance}.flac")
            samples.append(
                EvalSample(
                    id=utterance,
                    messages=_speech_turn(instruction, audio),
                    references=(text.strip(),),
                    source=where,
                )
            )
    return TaskData(samples)


def read_covost(data: Path, options: TaskOptions) -> TaskData:
    """CoVoST 2: a TSV of ``path``, ``sentence``, ``translation`` (module docstring)."""
    options.refuse("ast", "answers")
    if not data.is_file():
        raise EvalDataError(f"{data}: no such file")
    with open(data, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = reader.fieldnames or []
        missing = [c for c in _COVOST_COLUMNS if c not in header]
        if missing:
            raise EvalDataError(f"{data}:1: the header lacks the column(s) {missing} (has {header})")
        if options.split is not None and "split" not in header:
            raise EvalDataError(f"{data}: --split {options.split} needs a 'split' column")
        rows = [(reader.line_num, row) for row in reader]
    root = None
    instruction = options.prompt or AST_PROMPT
    samples = []
    for number, row in rows:
        rec = Record(row, f"{data}:{number}")
        if None in row or any(row.get(c) is None for c in header):
            raise rec.error(f"expected {len(header)} tab-separated fields")
        if options.split is not None and row["split"] != options.split:
            continue
        name = rec.get("path")
        translation = rec.get("translation")
        if root is None:
            root = find_media_root(options.media, (data.parent / "clips", data.parent), name, "CoVoST clips")
        audio = check_file(rec, root / name)
        samples.append(
            EvalSample(
                id=name,
                messages=_speech_turn(instruction, audio),
                references=(translation,),
                source=rec.where,
            )
        )
    return TaskData(samples)
