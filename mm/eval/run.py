"""``mm eval MODEL TASK DATA --out DIR``: answer a benchmark with a model and score it officially.

:func:`evaluate` reads the benchmark (:func:`mm.eval.tasks.read_task`), answers every sample greedily and
scores the answers (:func:`mm.eval.tasks.score_predictions`); the ``text`` task is scored by
log-likelihood instead (:mod:`mm.eval.text`). :func:`write_result` writes

* ``DIR/eval.json``: ``{"task", "score", "metric", "n", ..., "samples": [{"id", "prediction",
  "score"}]}``; besides those keys: ``model``, ``data``, ``batch_size``, ``max_new_tokens``, ``seconds``,
  ``skipped`` (records left out on purpose, with ``skipped_reason``), ``lower_is_better``, and for
  ``text`` also ``acc_norm`` and ``regression``;
* ``DIR/eval.md``: the same in a Markdown table.

Answers are decoded with continuous batching (:class:`mm.model.batching.DecodeBatch`): up to
``batch_size`` samples decode together, and a sample that finishes frees its slot for the next one at once.
Decoding is greedy, to the model's stop tokens or ``max_new_tokens``; a greedy row decodes what it decodes
alone, so the answers do not depend on ``batch_size`` (tested).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm._io import atomic_write_bytes, atomic_write_json
from mm.eval.samples import EvalDataError, EvalSample, TaskData, TaskOptions
from mm.eval.tasks import get_task, read_task, score_predictions
from mm.eval.text import evaluate_text

__all__ = ["EvalResult", "SampleResult", "evaluate", "generate_answers", "run_eval", "write_result"]


@dataclass(frozen=True)
class SampleResult:
    """One sample's line in ``eval.json``."""

    id: str | int
    prediction: str
    score: float


@dataclass(frozen=True)
class EvalResult:
    """A scored benchmark run.

    Attributes:
        task: the task's name.
        metric: the metric's name (:class:`mm.eval.tasks.Task`).
        score: the dataset's score.
        samples: per-sample predictions and scores, in file order.
        details: further top-level keys of ``eval.json`` (module docstring).
    """

    task: str
    metric: str
    score: float
    samples: tuple[SampleResult, ...]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.samples)

    def to_json(self) -> dict[str, Any]:
        """``eval.json``'s object: the five contract keys first, the details, then the samples."""
        head = {"task": self.task, "score": self.score, "metric": self.metric, "n": self.n}
        samples = [{"id": s.id, "prediction": s.prediction, "score": s.score} for s in self.samples]
        return {**head, **self.details, "samples": samples}

    def to_markdown(self) -> str:
        """``eval.md``: the score in a table, then the run's settings (and the text regression)."""
        task = get_task(self.task)
        better = "lower" if task.lower_is_better else "higher"
        lines = [
            f"# mm eval: {self.task}",
            "",
            "| task | metric | score | n |",
            "| --- | --- | ---: | ---: |",
            f"| {self.task} | {self.metric}: {task.description}, {better} is better | {self.score:.4f} "
            f"| {self.n} |",
        ]
        if "acc_norm" in self.details:
            lines.append(
                f"| {self.task} | acc_norm: accuracy by log-likelihood per character | "
                f"{self.details['acc_norm']:.4f} | {self.n} |"
            )
        regression = self.details.get("regression")
        if regression is not None:
            lines += [
                "",
                "## The backbone's promise (text-only prompts through the backbone alone and through mm)",
                "",
                "| check | result |",
                "| --- | --- |",
                f"| identical | {str(regression['identical']).lower()} |",
                f"| logits identical | {str(regression['logits_identical']).lower()} |",
                f"| max abs log-likelihood difference | {regression['max_abs_loglikelihood_diff']!r} |",
                f"| greedy answers identical ({regression['max_new_tokens']} tokens) | "
                f"{str(regression['answers_identical']).lower()} |",
                f"| prompts / continuations | {regression['prompts']} / {regression['continuations']} |",
            ]
        settings = [
            (k, self.details[k])
            for k in ("model", "data", "batch_size", "max_new_tokens", "seconds", "skipped", "skipped_reason")
            if self.details.get(k) not in (None, "")
        ]
        if settings:
            lines += ["", *(f"- {k}: {v}" for k, v in settings)]
        return "\n".join(lines) + "\n"


def _encode(model, sample: EvalSample):
    from mm.model.chat import encode_conversation

    try:
        return encode_conversation(model, sample.messages)
    except ValueError as e:
        raise EvalDataError(f"{sample.source} (id {sample.id!r}): {e}") from None


def generate_answers(
    model,
    samples: Sequence[EvalSample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = True,
    desc: str = "eval",
) -> list[str]:
    """The model's greedy answer to every sample, with up to ``batch_size`` decoding together.

    A sample is encoded (its media decoded) when a slot frees for it; a sample that finishes leaves at once.

    Raises:
        EvalDataError: a sample whose media cannot be decoded or whose prompt is too long (naming it).
    """
    from tqdm.auto import tqdm

    from mm.model.chat import GenerationOptions, JoinError, decode_queue

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = [""] * len(samples)
    with tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress) as bar:
        try:
            for finished in decode_queue(
                model,
                range(len(samples)),
                batch_size=batch_size,
                sample_for=lambda k: _encode(model, samples[k]),
                options_for=lambda k: options,
            ):
                for key, text in finished:
                    answers[key] = text
                bar.update(len(finished))
        except JoinError as e:  # a prompt that leaves no room to answer
            raise EvalDataError(
                f"samples {samples[e.keys[0]].id!r}..{samples[e.keys[-1]].id!r}: {e}"
            ) from None
    return answers


def evaluate(
    model,
    task: str,
    data: str | os.PathLike | TaskData,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
    options: TaskOptions | None = None,
) -> EvalResult:
    """Answer a benchmark and score it with its official metric.

    Args:
        model: a :class:`~mm.MultimodalModel` with a preprocessor, in eval mode.
        task: a task name (:data:`mm.eval.tasks.TASK_NAMES`).
        data: the benchmark's file or folder in its published layout, or samples already read.
        batch_size: samples decoding together (sequences per forward pass for ``text``).
        limit: score only the first ``limit`` samples.
        progress: show a progress bar.
        max_new_tokens: answer length limit (default: the task's).
        options: reader settings (``answers``, ``split``, ``media``, ``prompt``).

    Returns:
        The result; ``details`` holds ``batch_size``, ``max_new_tokens``, ``seconds``, ``skipped``,
        ``lower_is_better`` (and ``acc_norm``, ``regression`` for ``text``).
    """
    spec = get_task(task)
    loaded = data if isinstance(data, TaskData) else read_task(task, data, options)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    samples = loaded.samples[:limit]
    new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    start = time.monotonic()
    if spec.generates:
        answers = generate_answers(
            model, samples, batch_size=batch_size, max_new_tokens=new_tokens, progress=progress, desc=task
        )
        score, predictions, scores = score_predictions(spec, samples, answers)
        extra: dict[str, Any] = {}
    else:
        predictions, scores, extra = evaluate_text(
            model, samples, batch_size=batch_size, max_new_tokens=new_tokens, progress=progress
        )
        score = sum(scores) / len(scores)
    details = {
        "batch_size": batch_size,
        "max_new_tokens": new_tokens,
        "seconds": round(time.monotonic() - start, 3),
        "skipped": loaded.skipped,
        "skipped_reason": loaded.skipped_reason,
        "lower_is_better": spec.lower_is_better,
        **extra,
    }
    samples_out = tuple(SampleResult(s.id, p, float(v)) for s, p, v in zip(samples, predictions, scores))
    return EvalResult(
        task=spec.name, metric=spec.metric, score=float(score), samples=samples_out, details=details
    )


def write_result(result: EvalResult, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out`` (each atomically); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", result.to_json())
    atomic_write_bytes(out / "eval.md", result.to_markdown().encode())
    return out / "eval.json", out / "eval.md"


def _load_model(path: str, device: str | None, dtype: str | None):
    import torch

    from mm.model import MultimodalModel

    model = MultimodalModel.from_pretrained(path, dtype=None if dtype is None else getattr(torch, dtype))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def run_eval(args: argparse.Namespace) -> int:
    """``mm eval`` (arguments: :mod:`mm.cli`)."""
    options = TaskOptions(answers=args.answers, split=args.split, media=args.media, prompt=args.prompt)
    try:
        data = read_task(args.task, args.data, options)  # a bad file fails before the model loads
        model = _load_model(args.model, args.device, args.dtype)
        result = evaluate(
            model,
            args.task,
            data,
            batch_size=args.batch_size,
            limit=args.limit,
            progress=not args.no_progress,
            max_new_tokens=args.max_new_tokens,
        )
        result = EvalResult(
            result.task,
            result.metric,
            result.score,
            result.samples,
            {"model": str(args.model), "data": str(args.data), **result.details},
        )
        json_path, _ = write_result(result, args.out)
    except (ValueError, OSError) as e:
        print(f"mm eval: {e}", file=sys.stderr)
        return 2
    print(f"{result.task}: {result.metric} {result.score:.4f} over {result.n} samples -> {json_path}")
    if "regression" in result.details:
        regression = result.details["regression"]
        print(
            f"backbone regression: identical={str(regression['identical']).lower()} "
            f"(max abs log-likelihood difference {regression['max_abs_loglikelihood_diff']!r})"
        )
    return 0
