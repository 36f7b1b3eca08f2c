"""The tasks of ``mm eval``: for each, its reader, how an answer is scored, and how the scores add up.

| task | reads | metric (per sample -> dataset) |
| --- | --- | --- |
| ``vqav2`` | VQAv2 questions + annotations JSON, COCO images | VQA accuracy -> mean |
| ``textvqa`` | ``TextVQA_0.5.1_val.json``, images | VQA accuracy (TextVQA normaliser) -> mean |
| ``docvqa`` | ``val_v1.0.json``, ``documents/`` | ANLS -> mean |
| ``chartqa`` | ``test_human.json`` / ``test_augmented.json``, ``png/`` | relaxed accuracy -> mean |
| ``mcq`` | MMMU / AI2D parquet | option letter (MMMU rules) = gold -> mean |
| ``video-mcq`` | Video-MME / PerceptionTest JSON, videos | option letter (Video-MME prefixes) = gold -> mean |
| ``video-qa`` | ActivityNet-QA / MSRVTT-QA style JSON, videos | exact match after VQAv2's normaliser -> mean |
| ``asr`` | LibriSpeech folders | WER per utterance -> corpus WER (Whisper normaliser) |
| ``ast`` | CoVoST 2 TSV, clips | sentence BLEU -> corpus BLEU (sacreBLEU) |
| ``speech-qa`` | AudioBench / VoiceBench style JSON(L), audio | exact match after VQAv2's normaliser -> mean |
| ``text`` | lm-eval style multiple-choice JSONL | log-likelihood choice = gold -> mean (``acc``) |

Layouts and prompts: :mod:`mm.eval.vqa_tasks`, :mod:`mm.eval.choice_tasks`, :mod:`mm.eval.open_qa_tasks`,
:mod:`mm.eval.speech_tasks`, :mod:`mm.eval.text`. Metrics: the rest of :mod:`mm.eval`, each following its benchmark's official scorer.

Predictions are scored stripped of outer whitespace (the official scorers expect the model's answer
string; ANLS, relaxed accuracy and the letter rules all say to pass it stripped).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mm.eval.aggregate import mean_score
from mm.eval.anls import anls
from mm.eval.chartqa import relaxed_correctness
from mm.eval.choice import choice_accuracy, extract_choice, extract_video_choice
from mm.eval.choice_tasks import read_mcq, read_video_mcq
from mm.eval.open_qa_tasks import read_speech_qa, read_video_qa
from mm.eval.samples import EvalDataError, EvalSample, TaskData, TaskOptions
from mm.eval.speech import corpus_bleu, corpus_wer, sample_wer, sentence_bleu
from mm.eval.speech_tasks import read_covost, read_librispeech
from mm.eval.text import TEXT_MAX_NEW_TOKENS, read_text
from mm.eval.vqa import normalized_exact_match, textvqa_accuracy, vqa_accuracy
from mm.eval.vqa_tasks import read_chartqa, read_docvqa, read_textvqa, read_vqav2

__all__ = ["TASKS", "TASK_NAMES", "Task", "get_task", "read_task", "score_predictions"]

SampleScore = Callable[[str, EvalSample], float]
CorpusScore = Callable[[Sequence[str], Sequence[EvalSample]], float]


@dataclass(frozen=True, kw_only=True)
class Task:
    """One benchmark task of ``mm eval``.

    Args:
        name: the name on the command line.
        metric: the metric's name in ``eval.json`` (``vqa_accuracy``, ``anls``, ``wer``...).
        description: the metric in words, for ``eval.md``.
        read: the published files -> samples (``(DATA, options)``).
        sample_score: one stripped prediction and its sample -> the sample's score.
        corpus_score: predictions and samples -> the dataset's score; ``None``: the mean of sample scores.
        max_new_tokens: default answer length.
        lower_is_better: WER.
        generates: answers are generated (all but ``text``, which is scored by log-likelihood).
    """

    name: str
    metric: str
    description: str
    read: Callable[[Path, TaskOptions], TaskData]
    sample_score: SampleScore | None
    corpus_score: CorpusScore | None = None
    max_new_tokens: int = 16
    lower_is_better: bool = False
    generates: bool = True


def _choice(extract) -> SampleScore:
    def score(prediction: str, sample: EvalSample) -> float:
        return choice_accuracy(extract(prediction, sample.extra["options"]), sample.references[0])

    return score


def _wer(predictions: Sequence[str], samples: Sequence[EvalSample]) -> float:
    return corpus_wer(predictions, [s.references[0] for s in samples])


def _bleu(predictions: Sequence[str], samples: Sequence[EvalSample]) -> float:
    return corpus_bleu(predictions, [s.references[0] for s in samples])


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="vqav2",
            metric="vqa_accuracy",
            description="VQA accuracy (0-1; ten human answers, leave-one-out, VQAv2 normaliser)",
            read=read_vqav2,
            sample_score=lambda p, s: vqa_accuracy(p, s.references),
        ),
        Task(
            name="textvqa",
            metric="vqa_accuracy",
            description="VQA accuracy (0-1; ten human answers, leave-one-out, TextVQA normaliser)",
            read=read_textvqa,
            sample_score=lambda p, s: textvqa_accuracy(p, s.references),
        ),
        Task(
            name="docvqa",
            metric="anls",
            description="ANLS (0-1; threshold 0.5)",
            read=read_docvqa,
            sample_score=lambda p, s: anls(p, s.references),
            max_new_tokens=32,
        ),
        Task(
            name="chartqa",
            metric="relaxed_accuracy",
            description="relaxed accuracy (0-1; numbers within 5%, else exact)",
            read=read_chartqa,
            sample_score=lambda p, s: relaxed_correctness(p, s.references[0]),
        ),
        Task(
            name="mcq",
            metric="accuracy",
            description="accuracy (0-1; option letter extracted by MMMU's rules)",
            read=read_mcq,
            sample_score=_choice(extract_choice),
            max_new_tokens=32,
        ),
        Task(
            name="video-mcq",
            metric="accuracy",
            description="accuracy (0-1; option letter after Video-MME's answer prefixes, MMMU's rules)",
            read=read_video_mcq,
            sample_score=_choice(extract_video_choice),
            max_new_tokens=32,
        ),
        Task(
            name="video-qa",
            metric="accuracy",
            description="accuracy (0-1; exact match after VQAv2's answer normaliser)",
            read=read_video_qa,
            sample_score=lambda p, s: normalized_exact_match(p, s.references),
        ),
        Task(
            name="asr",
            metric="wer",
            description="corpus WER (fraction; Whisper English normaliser, jiwer)",
            read=read_librispeech,
            sample_score=lambda p, s: sample_wer(p, s.references[0]),
            corpus_score=_wer,
            max_new_tokens=256,
            lower_is_better=True,
        ),
        Task(
            name="ast",
            metric="bleu",
            description="corpus BLEU (0-100; sacreBLEU defaults, 13a)",
            read=read_covost,
            sample_score=lambda p, s: sentence_bleu(p, s.references[0]),
            corpus_score=_bleu,
            max_new_tokens=256,
        ),
        Task(
            name="speech-qa",
            metric="accuracy",
            description="accuracy (0-1; exact match after VQAv2's answer normaliser)",
            read=read_speech_qa,
            sample_score=lambda p, s: normalized_exact_match(p, s.references),
            max_new_tokens=32,
        ),
        Task(
            name="text",
            metric="acc",
            description="accuracy by log-likelihood (0-1; lm-evaluation-harness acc)",
            read=read_text,
            sample_score=None,
            max_new_tokens=TEXT_MAX_NEW_TOKENS,
            generates=False,
        ),
    )
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: no such task (the message lists them).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}") from None


def read_task(name: str, data: str | os.PathLike, options: TaskOptions | None = None) -> TaskData:
    """Read ``data`` (a file or folder in the task's published layout) into samples.

    Raises:
        EvalDataError: a missing file, a malformed record (named by file and line or index), or no sample.
    """
    task = get_task(name)
    loaded = task.read(Path(data), options or TaskOptions())
    if not loaded.samples:
        raise EvalDataError(f"{data}: no {name} samples")
    ids = [s.id for s in loaded.samples]
    if len(set(ids)) != len(ids):
        seen: set = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise EvalDataError(f"{data}: the id {twice!r} is used by more than one sample")
    return loaded


def score_predictions(
    task: Task, samples: Sequence[EvalSample], predictions: Sequence[str]
) -> tuple[float, list[str], list[float]]:
    """Score answers with the task's official metric.

    Args:
        task: a generating task.
        samples: the samples answered.
        predictions: the model's answers, in the same order (stripped here).

    Returns:
        ``(dataset score, stripped predictions, per-sample scores)``.
    """
    if task.sample_score is None:
        raise ValueError(f"the task {task.name!r} is scored by log-likelihood, not from answers")
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    stripped = [p.strip() for p in predictions]
    scores = [task.sample_score(p, s) for p, s in zip(stripped, samples)]
    if task.corpus_score is not None:
        return task.corpus_score(stripped, samples), stripped, scores
    return mean_score(scores), stripped, scores
