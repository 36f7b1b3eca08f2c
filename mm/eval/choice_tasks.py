"""Readers of the multiple-choice benchmarks: images (MMMU, AI2D) and videos (Video-MME, PerceptionTest).

Options are lettered A, B, ... in order and written one a line as ``A. text`` (MMMU's
``get_multi_choice_info`` / Video-MME's layout); the reference is the gold letter, and the answer is
scored by :func:`mm.eval.extract_choice` (images) or :func:`mm.eval.extract_video_choice` (videos).

**mcq** (``mm eval MODEL mcq DATA``): ``DATA`` is a parquet file, or a folder whose ``*.parquet`` files
(recursively; with ``--split NAME`` only those named ``NAME-*.parquet``, e.g. MMMU's ``validation``) are
read in sorted order; a ``.json``/``.jsonl`` file of the same records works too. Columns:

* ``question``; ``options``: a list, or the string of a Python list (MMMU); ``answer``: the gold letter
  (MMMU) or the 0-based index of the gold option, as a number or a digit string (AI2D);
* ``id`` (optional; else ``"<file stem>-<row>"``); ``question_type`` (optional: ``"open"`` questions,
  MMMU's short-answer ones, are skipped and counted, as is any record with no options);
* images: ``image_1`` ... ``image_7`` (MMMU) or ``image`` (AI2D), each ``{"bytes", "path"}`` (parquet) or
  a path relative to the file. The images a question or its options cite as ``<image n>`` are shown, in
  number order (lmms-eval's MMMU rule); with no citation, every image the record has. The ``<image n>``
  tags stay in the text, so the model knows which image is which.

Prompt: ``{question}\\nA. ...\\nB. ...\\n{instruction}``, instruction "Answer with the option's letter
from the given choices directly." (MMMU's and lmms-eval's; ``--prompt`` replaces it). Images come first.

**video-mcq**: a JSON list or JSON Lines file of records (Video-MME / MVBench style), or PerceptionTest's
``mc_question`` file (``{video_id: {"mc_question": [{"id", "question", "options", "answer_id"}]}}``,
ids ``"<video_id>-<id>"``). Record keys:

* ``id`` or ``question_id``; ``question``;
* the video: ``video`` (a path relative to the media folder), or ``videoID`` / ``video_id`` (the file
  ``<value>.mp4``); the media folder is ``--media``, else ``videos/`` or ``data/`` beside the file, else
  the file's own folder;
* ``options`` or ``candidates``: a list of strings (Video-MME's ``"A. text"`` prefixes are removed when
  every option carries its own letter);
* ``answer``: the gold letter, or the text of the gold option (MVBench); or ``answer_id``: its 0-based
  index (PerceptionTest).

Prompt (Video-MME's): "Select the best answer to the following multiple-choice question based on the
video. Respond with only the letter (A, B, C, or D) of the correct option." (``--prompt`` replaces it),
then the question, the options and "The best answer is:". The video comes first.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from mm.eval.choice import option_letters
from mm.eval.samples import (
    EvalDataError,
    EvalSample,
    Record,
    TaskData,
    TaskOptions,
    check_file,
    find_media_root,
    load_json,
    load_records,
    user_turn,
)

__all__ = ["MCQ_PROMPT", "VIDEO_MCQ_PROMPT", "format_options", "read_mcq", "read_video_mcq"]

MCQ_PROMPT = "Answer with the option's letter from the given choices directly."
VIDEO_MCQ_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter ({letters}) of the correct option."
)
_MAX_OPTIONS = 26
_IMAGE_TAG = re.compile(r"<image (\d+)>")
_IMAGE_COLUMNS = ("image", *(f"image_{i}" for i in range(1, 8)))


def format_options(options: list[str]) -> str:
    """``"A. first\\nB. second..."``."""
    return "\n".join(f"{letter}. {text}" for letter, text in zip(option_letters(len(options)), options))


def _letters_phrase(n: int) -> str:
    """``"A, B, C, or D"`` for 4 options, ``"A or B"`` for 2 (Video-MME's wording, any count)."""
    letters = option_letters(n)
    return " or ".join(letters) if n == 2 else f"{', '.join(letters[:-1])}, or {letters[-1]}"


def _gold_letter(rec: Record, options: list[str], *, text_answers: bool) -> str:
    """The gold letter from ``answer`` (letter, index or option text) or ``answer_id`` (index)."""
    letters = option_letters(len(options))
    if rec.has("answer_id"):
        index = rec.get("answer_id", kind=int)
    else:
        answer = rec.get("answer", kind=(str, int))
        if isinstance(answer, str) and answer.strip() in letters:
            return answer.strip()
        if isinstance(answer, str) and answer.strip().isdigit():
            index = int(answer.strip())
        elif isinstance(answer, int):
            index = answer
        elif text_answers and answer in options:
            return letters[options.index(answer)]
        else:
            raise rec.error(
                f"'answer' {answer!r} is neither one of the letters {letters} nor an option index"
            )
    if not 0 <= index < len(options):
        raise rec.error(f"the answer index {index} is outside the {len(options)} options")
    return letters[index]


def _options(rec: Record) -> list[str] | None:
    """The option texts (``options`` or ``candidates``: a list or a Python list's string), or None."""
    name = "options" if rec.has("options") else "candidates"
    if not rec.has(name):
        return None
    value: Any = rec.data[name]
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise rec.error(
                f"{name!r} is not a list nor the string of a Python list: {value!r:.80}"
            ) from None
    if hasattr(value, "tolist"):  # a parquet list column reads as a numpy array
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | int | float) for v in value):
        raise rec.error(f"{name!r} must be a list of strings, got {value!r:.80}")
    if len(value) > _MAX_OPTIONS:
        raise rec.error(f"{len(value)} options; at most {_MAX_OPTIONS} can be lettered")
    return [str(v) for v in value]


# ---------------------------------------------------------------------------------------- images
def _mcq_files(data: Path, split: str | None) -> list[Path]:
    if data.is_file():
        if split is not None:
            raise EvalDataError("--split chooses parquet files in a folder; DATA is one file")
        return [data]
    if not data.is_dir():
        raise EvalDataError(f"{data}: no such file or folder")
    files = sorted(p for p in data.rglob("*.parquet") if split is None or p.name.startswith(f"{split}-"))
    if not files:
        raise EvalDataError(f"{data}: no {f'{split}-*' if split else '*'}.parquet files")
    return files


def _table_records(path: Path) -> list[Record]:
    if path.suffix != ".parquet":
        return load_records(path)
    import pandas as pd

    try:
        rows = pd.read_parquet(path).to_dict("records")
    except Exception as e:  # pyarrow raises several kinds on a broken file
        raise EvalDataError(f"{path}: not a readable parquet file ({e})") from None
    return [Record(row, f"{path}: row {i}") for i, row in enumerate(rows)]


def _image(rec: Record, column: str, base: Path) -> Any:
    """The image under ``column``: parquet's ``{"bytes", "path"}`` (the bytes), or a path string."""
    value = rec.data[column]
    if isinstance(value, dict) and value.get("bytes") is not None:
        return bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value:
        return check_file(rec, base / value)
    raise rec.error(f"{column!r} holds no image (expected {{'bytes', 'path'}} or a path)")


def read_mcq(data: Path, options: TaskOptions) -> TaskData:
    """MMMU / AI2D style multiple choice over images (module docstring)."""
    options.refuse("mcq", "answers")
    media = Path(options.media) if options.media is not None else None
    samples, skipped = [], 0
    for path in _mcq_files(data, options.split):
        for row, rec in enumerate(_table_records(path)):
            texts = _options(rec)
            if rec.get("question_type", required=False) == "open" or not texts:
                skipped += 1
                continue
            question = rec.get("question")
            gold = _gold_letter(rec, texts, text_answers=False)
            cited = sorted({int(n) for n in _IMAGE_TAG.findall(" ".join([question, *texts]))})
            columns = [f"image_{n}" for n in cited] or [c for c in _IMAGE_COLUMNS if rec.has(c)]
            missing = [c for c in columns if not rec.has(c)]
            if missing:
                raise rec.error(f"the question cites {missing[0]!r}, which is empty")
            images = [{"type": "image", "image": _image(rec, c, media or path.parent)} for c in columns]
            text = f"{question.strip()}\n{format_options(texts)}\n{options.prompt or MCQ_PROMPT}"
            sample_id = rec.get("id", kind=(str, int), required=False)
            samples.append(
                EvalSample(
                    id=sample_id if sample_id is not None else f"{path.stem}-{row}",
                    messages=user_turn(images, text),
                    references=(gold,),
                    extra={"options": texts},
                    source=rec.where,
                )
            )
    return TaskData(samples, skipped, "open-ended questions (no options)" if skipped else "")


# ---------------------------------------------------------------------------------------- videos
def _video_records(data: Path) -> list[Record]:
    """Records of a list / JSON Lines file, or of PerceptionTest's ``{video_id: {"mc_question": [...]}}``."""
    if data.suffix == ".jsonl":
        return load_records(data)
    doc = load_json(data)
    if isinstance(doc, list):
        return load_records(data)
    if not isinstance(doc, dict):
        raise EvalDataError(
            f"{data}: expected a list of records or PerceptionTest's {{video_id: ...}} object"
        )
    records = []
    for video_id, entry in doc.items():
        where = f"{data}: [{video_id!r}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("mc_question"), list):
            raise EvalDataError(f"{where}: expected an object with an 'mc_question' list")
        for k, question in enumerate(entry["mc_question"]):
            rec = Record(question, f"{where}.mc_question[{k}]")
            qid = rec.get("id", kind=(int, str))
            records.append(Record({**question, "id": f"{video_id}-{qid}", "video_id": video_id}, rec.where))
    return records


def _strip_letters(options: list[str]) -> list[str]:
    """Video-MME writes ``"A. text"``: drop the prefixes when every option carries its own letter."""
    letters = option_letters(len(options))
    if all(o.startswith(f"{letter}.") for letter, o in zip(letters, options)):
        return [o[2:].strip() for o in options]
    return options


def _video_name(rec: Record) -> str:
    if rec.has("video"):
        return rec.get("video")
    return f"{rec.get('videoID', 'video_id', kind=(str, int))}.mp4"


def read_video_mcq(data: Path, options: TaskOptions) -> TaskData:
    """Video multiple choice (module docstring)."""
    options.refuse("video-mcq", "answers", "split")
    records = _video_records(data)
    root = None
    samples = []
    for rec in records:
        sample_id = rec.get("id", "question_id", kind=(str, int))
        question = rec.get("question")
        texts = _options(rec)
        if texts is None or len(texts) < 2:
            raise rec.error("'options' (or 'candidates') must list at least two options")
        texts = _strip_letters(texts)
        letter = _gold_letter(rec, texts, text_answers=True)
        name = _video_name(rec)
        if root is None:
            root = find_media_root(
                options.media, (data.parent / "videos", data.parent / "data", data.parent), name, "videos"
            )
        video = check_file(rec, root / name)
        instruction = options.prompt or VIDEO_MCQ_PROMPT.format(letters=_letters_phrase(len(texts)))
        text = f"{instruction}\n{question.strip()}\n{format_options(texts)}\nThe best answer is:"
        samples.append(
            EvalSample(
                id=sample_id,
                messages=user_turn([{"type": "video", "video": video}], text),
                references=(letter,),
                extra={"options": texts},
                source=rec.where,
            )
        )
    return TaskData(samples)
