"""The demo's evaluation sets, written in published layouts and scored by ``mm eval``'s own code.

Every figure of ``mm demo`` that a benchmark task of ``mm eval`` can measure is measured by it: the
demo writes its held-out samples under ``OUT/eval-data/`` in that benchmark's layout, and
:func:`score` runs :func:`mm.eval.run.evaluate` on the files (the function ``mm eval`` calls), writes
``eval.json`` / ``eval.md`` under ``OUT/eval/NAME/`` and returns the result with the command that
reproduces it (``mm eval MODEL TASK DATA --out DIR ...``).

| demo set | written as | ``mm eval`` task, metric |
| --- | --- | --- |
| image questions | VQAv2 questions + annotations (ten copies of the answer; ``question_type`` is the kind) | ``vqav2``, VQA accuracy (= exact match after VQAv2's normaliser) |
| speech recognition | a LibriSpeech split folder (FLAC, ``*.trans.txt``) | ``asr``, corpus WER (Whisper normaliser, jiwer) |
| speech translation | a CoVoST 2 TSV with ``clips/`` | ``ast``, corpus BLEU (sacreBLEU) |
| video questions | an ActivityNet-QA style JSON list (``type`` is the kind) with ``videos/`` | ``video-qa``, exact match after VQAv2's normaliser |
| spoken questions | an AudioBench style JSON Lines file with ``audio/`` (FLAC, no instruction) | ``speech-qa``, exact match after VQAv2's normaliser |

Images are written losslessly as PNG data under VQAv2's ``COCO_{split}_{id:012d}.jpg`` names (every
decoder mm uses reads an image by its content; JPEG would change the pixels the demo generated).
Audio is 16-bit FLAC; videos are the demo's own mp4 files, copied. What no task measures (the text model
repeating or translating words given as text) is answered by the same answer loop
(:func:`mm.eval.run.generate_answers`, :func:`answer_turns`).
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_SPLIT",
    "ScoredSet",
    "answer_turns",
    "per_kind",
    "score",
    "write_covost",
    "write_librispeech",
    "write_speech_qa",
    "write_video_qa",
    "write_vqav2",
]

DEMO_SPLIT = "demo"  # the VQAv2 split name of the demo's image questions
_SPEAKER, _CHAPTER = 1, 1  # LibriSpeech ids of the demo's one synthetic voice


@dataclass(frozen=True)
class ScoredSet:
    """A demo set scored by ``mm eval``'s code.

    Attributes:
        result: the :class:`mm.eval.run.EvalResult` (per-sample predictions and scores in file order).
        command: the ``mm eval`` command line that reproduces it.
        out: the folder ``eval.json`` and ``eval.md`` were written to.
    """

    result: Any
    command: str
    out: Path

    def provenance(self) -> dict[str, Any]:
        """What the report says about a figure: the task, the metric and the command."""
        return {"task": self.result.task, "metric": self.result.metric, "command": self.command}


def write_vqav2(samples: Sequence[Any], folder: Path) -> Path:
    """Write image questions (:class:`~mm.demo.image_data.QASample`) as a VQAv2 split ``demo`` under
    ``folder``: the questions file, the annotations file (ten copies of the answer) and the images;
    returns the questions file (``mm eval``'s DATA; its name states the split)."""
    images = folder / DEMO_SPLIT
    images.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for qid, s in enumerate(samples):
        s.image.save(
            images / f"COCO_{DEMO_SPLIT}_{qid:012d}.jpg", format="PNG"
        )  # lossless (module docstring)
        questions.append({"question_id": qid, "image_id": qid, "question": s.question})
        answers = [{"answer": s.answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
        annotations.append(
            {
                "question_id": qid,
                "image_id": qid,
                "question_type": s.kind,
                "answer_type": "other",
                "multiple_choice_answer": s.answer,
                "answers": answers,
            }
        )
    questions_file = folder / f"v2_OpenEnded_mscoco_{DEMO_SPLIT}_questions.json"
    _write_json(
        questions_file,
        {"data_subtype": DEMO_SPLIT, "questions": questions},
    )
    _write_json(folder / f"v2_mscoco_{DEMO_SPLIT}_annotations.json", {"annotations": annotations})
    return questions_file


def _write_json(path: Path, obj: Any) -> None:
    from mm._io import atomic_write_json

    atomic_write_json(path, obj)


def _flac(wave, path: Path, sample_rate: int) -> None:
    """``[samples]`` float audio as 16-bit mono FLAC (the same samples as the demo's WAV files)."""
    import av
    import numpy as np

    samples = np.asarray(wave.detach().cpu() if hasattr(wave, "detach") else wave, dtype=np.float32)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = sample_rate
        frame.time_base = Fraction(1, sample_rate)
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_librispeech(
    samples: Sequence[Any], waves: Sequence[Any], folder: Path, *, sample_rate: int = 16000
) -> Path:
    """Write recognition utterances as a LibriSpeech split folder (``1/1/1-1.trans.txt`` and
    ``1-1-NNNN.flac``); returns the split folder (``mm eval``'s DATA)."""
    chapter = folder / str(_SPEAKER) / str(_CHAPTER)
    chapter.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (s, wave) in enumerate(zip(samples, waves, strict=True)):
        utterance = f"{_SPEAKER}-{_CHAPTER}-{i:04d}"
        _flac(wave, chapter / f"{utterance}.flac", sample_rate)
        lines.append(f"{utterance} {s.answer}")
    (chapter / f"{_SPEAKER}-{_CHAPTER}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_covost(
    samples: Sequence[Any], waves: Sequence[Any], folder: Path, *, sample_rate: int = 16000
) -> Path:
    """Write translation utterances as a CoVoST 2 TSV (``covost_v2.en_fr.demo.tsv``, clips in
    ``clips/``); returns the TSV (``mm eval``'s DATA)."""
    from mm.serving.speech_out import wav_bytes

    clips = folder / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows = ["client_id\tpath\tsentence\ttranslation"]
    for i, (s, wave) in enumerate(zip(samples, waves, strict=True)):
        name = f"demo_{i:04d}.wav"
        (clips / name).write_bytes(wav_bytes(wave, sample_rate))
        for field in (s.text, s.answer):
            if "\t" in field or "\n" in field:
                raise ValueError(f"a CoVoST field cannot hold tabs or new lines: {field!r}")
        rows.append(f"demo\t{name}\t{s.text}\t{s.answer}")
    tsv = folder / "covost_v2.en_fr.demo.tsv"
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tsv


def write_video_qa(samples: Sequence[Any], videos: Sequence[Path], folder: Path) -> Path:
    """Write video questions (:class:`~mm.demo.video_data.VideoQASample`, with their mp4 files) as an
    open-ended video QA set: ``test_qa.json`` (``[{"question_id", "video", "question", "answer",
    "type"}]``, ``type`` the question's kind) and the clips in ``videos/``; returns the JSON file."""
    import shutil

    clips = folder / "videos"
    clips.mkdir(parents=True, exist_ok=True)
    records = []
    for qid, (s, video) in enumerate(zip(samples, videos, strict=True)):
        name = f"{qid:06d}{Path(video).suffix}"
        shutil.copyfile(video, clips / name)
        records.append(
            {"question_id": qid, "video": name, "question": s.question, "answer": s.answer, "type": s.kind}
        )
    path = folder / "test_qa.json"
    _write_json(path, records)
    return path


def write_speech_qa(
    samples: Sequence[Any], waves: Sequence[Any], folder: Path, *, sample_rate: int = 16000
) -> Path:
    """Write spoken questions (:class:`~mm.demo.speech_data.SpeechSample`) as an open spoken-QA set:
    ``speech_qa.jsonl`` (``{"id", "audio", "answer", "question"}`` a line, ``question`` the words
    said; no ``instruction``: the speech is the whole turn, as the demo trains) and FLAC clips in
    ``audio/``; returns the JSON Lines file."""
    audio = folder / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (s, wave) in enumerate(zip(samples, waves, strict=True)):
        key = f"qa-{i:04d}"
        _flac(wave, audio / f"{key}.flac", sample_rate)
        lines.append(json.dumps({"id": key, "audio": f"{key}.flac", "answer": s.answer, "question": s.text}))
    path = folder / "speech_qa.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def score(
    model,
    model_dir: Path,
    task: str,
    data: Path,
    out: Path,
    *,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> ScoredSet:
    """Score ``model`` (loaded from ``model_dir``) on ``data`` with ``mm eval``'s ``task``, as
    ``mm eval model_dir task data --out out`` does; write ``eval.json`` and ``eval.md`` into ``out``."""
    from mm.eval.run import EvalResult, evaluate, write_result
    from mm.eval.samples import TaskOptions

    result = evaluate(
        model,
        task,
        data,
        batch_size=batch_size,
        progress=False,
        max_new_tokens=max_new_tokens,
        options=TaskOptions(prompt=prompt),
    )
    result = EvalResult(
        result.task,
        result.metric,
        result.score,
        result.samples,
        {"model": str(model_dir), "data": str(data), **result.details},
    )
    write_result(result, out)
    words = ["mm", "eval", str(model_dir), task, str(data), "--out", str(out)]
    if prompt is not None:
        words += ["--prompt", prompt]
    if max_new_tokens is not None:
        words += ["--max-new-tokens", str(max_new_tokens)]
    return ScoredSet(result, shlex.join(words), out)


def answer_turns(model, turns: Sequence[list[dict[str, Any]]], *, max_new_tokens: int) -> list[str]:
    """Greedy answers to conversations no ``mm eval`` task reads, through ``mm eval``'s answer loop
    (:func:`mm.eval.run.generate_answers`), stripped as ``mm eval`` strips them."""
    from mm.eval.run import generate_answers
    from mm.eval.samples import EvalSample

    samples = [EvalSample(id=i, messages=list(t), references=()) for i, t in enumerate(turns)]
    answers = generate_answers(model, samples, batch_size=32, max_new_tokens=max_new_tokens, progress=False)
    return [a.strip() for a in answers]


def per_kind(kinds: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """The mean per-sample score of each kind, in sorted order (from ``eval.json``'s sample scores)."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for kind, value in zip(kinds, scores, strict=True):
        grouped[kind].append(value)
    return {k: sum(v) / len(v) for k, v in sorted(grouped.items())}


def read_scores(eval_json: Path) -> list[float]:
    """The per-sample scores of an ``eval.json``, in file order."""
    return [s["score"] for s in json.loads(Path(eval_json).read_text())["samples"]]
