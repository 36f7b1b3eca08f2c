"""ANLS, the DocVQA metric (Biten et al., "Scene Text Visual Question Answering", ICCV 2019, eq. 1).

Per question: ``1 - NL`` for the closest gold answer, where NL is the Levenshtein distance divided by the
length of the longer string, and 0 when that similarity falls below 0.5. The dataset score is the mean over
questions (:func:`mm.eval.mean_score`), on 0-1 as DocVQA reports it.

Source followed: the official DocVQA / InfographicVQA evaluation script (docvqa.org, rrc.cvc.uab.es
``?ch=17``; ``evaluate_method``). Its details, kept here:

* both strings are stripped, lower-cased and their inner whitespace collapsed to single spaces before the
  distance is taken;
* the distance is divided by ``max(len(gold.upper()), len(prediction.upper()))`` of the strings *as given*
  (before stripping), so outer or repeated whitespace lengthens the divisor — callers should pass the
  stripped model output (the gold answers are the dataset's, the same for every model);
* two empty strings have distance 0 (similarity 1);
* a similarity equal to the threshold is kept: the script zeroes ``1 - NL < 0.5``, so NL = 0.5 scores 0.5,
  where the paper's ``NL < tau`` would give 0.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ANLS_THRESHOLD", "anls", "levenshtein_distance"]

# Least similarity that still scores (the script's ``--anls_threshold`` default; tau = 0.5 in the paper).
ANLS_THRESHOLD = 0.5


def levenshtein_distance(a: str, b: str) -> int:
    """Fewest single-character insertions, deletions and substitutions turning ``a`` into ``b``.

    Unit costs, as the official script's ``levenshtein_distance`` (Levenshtein 1966); dynamic programming
    over one row of the edit table at a time.

    Args:
        a: first string.
        b: second string.

    Returns:
        The edit distance, e.g. 3 for ``"kitten"`` and ``"sitting"``.
    """
    if len(a) < len(b):
        a, b = b, a
    # row[j]: distance between the prefix of ``a`` read so far and b[:j].
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        diagonal, row[0] = row[0], i
        for j, char_b in enumerate(b, start=1):
            substitute = diagonal + (char_a != char_b)
            diagonal = row[j]
            row[j] = min(substitute, row[j] + 1, row[j - 1] + 1)
    return row[-1]


def _collapse(text: str) -> str:
    """Strip, lower-case and collapse whitespace, as the official script does to both strings."""
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against the gold answers of its question, in [0, 1].

    Args:
        prediction: the model's answer (pass it stripped; see the module docstring).
        answers: the accepted gold answers.
        threshold: least similarity ``1 - NL`` that scores; below it the question scores 0.

    Returns:
        ``max`` over gold answers of ``1 - NL``, or 0 when that is below ``threshold``; e.g. ``"kitten"``
        against ``["sitting"]`` is ``1 - 3/7``.

    Raises:
        ValueError: when ``answers`` is empty.
    """
    if not answers:
        raise ValueError("ANLS needs at least one gold answer")
    predicted = _collapse(prediction)
    distances = []
    for gold in answers:
        length = max(len(gold.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein_distance(_collapse(gold), predicted) / length)
    similarity = 1 - min(distances)
    return 0.0 if similarity < threshold else similarity
