"""Dataset scores from per-sample scores.

VQAv2, TextVQA, DocVQA (ANLS), ChartQA (relaxed accuracy) and the multiple-choice benchmarks all report the
plain mean of their per-question scores (vqaEval.py ``setAccuracy``; the DocVQA script's ``totalScore`` over
questions; pix2struct ``aggregate_metrics``; MMMU ``evaluate``). WER and BLEU are corpus-level instead
(:mod:`mm.eval.speech`).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["mean_score"]


def mean_score(scores: Iterable[float]) -> float:
    """The mean of per-sample scores, on the scale they come in (mm's per-sample scores are in [0, 1]).

    Args:
        scores: one score per sample.

    Raises:
        ValueError: when there is no score (an empty dataset has no accuracy; the official scripts print 0
            or divide by zero).
    """
    values = [float(score) for score in scores]
    if not values:
        raise ValueError("no scores to average")
    return sum(values) / len(values)
