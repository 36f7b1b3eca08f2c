"""Readers of the open-ended QA benchmarks about videos and spoken questions: short answers, exact match.

**video-qa** (``mm eval MODEL video-qa DATA``): ActivityNet-QA / MSRVTT-QA / Video-ChatGPT style. ``DATA``
is a JSON list (or a JSON Lines file) of records:

* ``question_id`` or ``id`` (a string or an integer; optional, else ``"<file stem>-<index>"``);
* the video: ``video`` (a path relative to the media folder, e.g. ``"video7010.mp4"``), or
  ``video_name`` (ActivityNet-QA's bare name: the first of ``NAME``, ``NAME.mp4``, ``NAME.mkv``,
  ``NAME.webm``, ``v_NAME.mp4``, ``v_NAME.mkv``, ``v_NAME.webm`` that exists); the media folder is
  ``--media``, else ``videos/`` beside the file, else the file's own folder;
* ``question``; ``answer``: the gold short answer (a string, or a number written as one).

Prompt: the video, then ``{question}\\n{instruction}`` with lmms-eval's instruction for these sets,
"Answer the question using a single word or phrase." (``--prompt`` replaces it; ``--prompt ""`` asks the
question alone, as ``mm demo`` trains its model to be asked).

**speech-qa** (AudioBench / VoiceBench style open QA): ``DATA`` is a JSON list or JSON Lines file of
records ``{"id", "audio", "answer"}`` with an optional text ``instruction``:

* ``id`` (optional, else ``"<file stem>-<index>"``); ``audio``: a path relative to the media folder
  (``--media``, else ``audio/`` beside the file, else the file's own folder); ``answer``: as above;
* the user's turn is the instruction in text, then the audio (the order of the ``asr``/``ast`` tasks);
  the record's ``instruction`` if it has one, else ``--prompt``, else the audio alone (the spoken question
  is the whole turn, as in VoiceBench and ``mm demo``).

Scoring (:mod:`mm.eval.tasks`): accuracy = exact match after VQAv2's answer normaliser
(:func:`mm.eval.vqa.normalized_exact_match`), mean over samples.
"""

from __future__ import annotations

from pathlib import Path

from mm.eval.samples import (
    EvalDataError,
    EvalSample,
    Record,
    TaskData,
    TaskOptions,
    check_file,
    load_records,
    user_turn,
)
from mm.eval.vqa_tasks import VQA_PROMPT

__all__ = ["VIDEO_QA_PROMPT", "read_speech_qa", "read_video_qa"]

VIDEO_QA_PROMPT = VQA_PROMPT
_VIDEO_SUFFIXES = ("", ".mp4", ".mkv", ".webm")


def _id(rec: Record, names: tuple[str, ...], data: Path, index: int) -> str | int:
    value = rec.get(*names, kind=(str, int), required=False)
    return f"{data.stem}-{index}" if value is None else value


def _answer(rec: Record) -> str:
    value = rec.get("answer", kind=(str, int, float))
    return value if isinstance(value, str) else str(value)


def _media_root(given, candidates: tuple[Path, ...], names: list[str], what: str) -> Path:
    """``--media``, else the first candidate holding one of ``names`` (the first record's files)."""
    if given is not None:
        root = Path(given)
        if not root.is_dir():
            raise EvalDataError(f"--media {root}: no such folder")
        return root
    for root in candidates:
        if any((root / name).is_file() for name in names):
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise EvalDataError(f"cannot find the {what} (looked in {tried}); name the folder with --media")


def _video_names(rec: Record) -> list[str]:
    """The file names a record's video may have (one for ``video``; ActivityNet's forms for ``video_name``)."""
    if rec.has("video"):
        return [rec.get("video")]
    name = str(rec.get("video_name", kind=(str, int)))
    return [f"{prefix}{name}{suffix}" for prefix in ("", "v_") for suffix in _VIDEO_SUFFIXES]


def read_video_qa(data: Path, options: TaskOptions) -> TaskData:
    """Open-ended video QA: a JSON list / JSON Lines file of questions with short answers (module docstring)."""
    options.refuse("video-qa", "answers", "split")
    instruction = VIDEO_QA_PROMPT if options.prompt is None else options.prompt
    root = None
    samples = []
    for i, rec in enumerate(load_records(data)):
        qid = _id(rec, ("question_id", "id"), data, i)
        question = rec.get("question")
        answer = _answer(rec)
        names = _video_names(rec)
        if root is None:
            root = _media_root(options.media, (data.parent / "videos", data.parent), names, "videos")
        found = next((root / n for n in names if (root / n).is_file()), root / names[0])
        video = check_file(rec, found)
        text = f"{question.strip()}\n{instruction}" if instruction else question.strip()
        samples.append(
            EvalSample(
                id=qid,
                messages=user_turn([{"type": "video", "video": video}], text),
                references=(answer,),
                source=rec.where,
            )
        )
    return TaskData(samples)


def read_speech_qa(data: Path, options: TaskOptions) -> TaskData:
    """Spoken QA: a JSON list / JSON Lines file of ``{"id", "audio", "answer"}`` (module docstring)."""
    options.refuse("speech-qa", "answers", "split")
    root = None
    samples = []
    for i, rec in enumerate(load_records(data)):
        qid = _id(rec, ("id",), data, i)
        name = rec.get("audio")
        answer = _answer(rec)
        instruction = rec.get("instruction", required=False)
        if instruction is None:
            instruction = options.prompt or None
        if root is None:
            root = _media_root(options.media, (data.parent / "audio", data.parent), [name], "audio files")
        audio = check_file(rec, root / name)
        content = [{"type": "text", "text": instruction}] if instruction else []
        content.append({"type": "audio", "audio": audio})
        samples.append(
            EvalSample(
                id=qid,
                messages=[{"role": "user", "content": content}],
                references=(answer,),
                source=rec.where,
            )
        )
    return TaskData(samples)
