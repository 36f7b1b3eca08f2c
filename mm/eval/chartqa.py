"""Relaxed accuracy, the ChartQA metric (Masry et al., Findings of ACL 2022, section 5.1).

A numeric answer is right when it lies within 5% of the gold number; any other answer must match exactly
(the relaxed accuracy of Methani et al., WACV 2020). The dataset score is the mean over questions
(:func:`mm.eval.mean_score`); ChartQA papers report it times 100.

Source followed: google-research/pix2struct ``pix2struct/metrics.py``, ``relaxed_correctness`` (with its
``_to_float``), the implementation published with Pix2Struct (Lee et al., ICML 2023) that ChartQA results
are commonly computed with. Its details, kept here:

* a number is whatever Python's ``float`` accepts (so surrounding whitespace, ``1e3`` or ``1_000`` too);
  a text ending in ``%`` is read as that number over 100 (every trailing ``%`` is removed first), so
  ``"45%"`` equals ``"0.45"``;
* the relative change ``|prediction - target| / |target|`` may be up to and including 5%;
* a target of zero cannot be divided by and falls back to the string comparison, as do non-numbers;
* the string comparison lower-cases both sides and nothing else (no stripping, no punctuation rules).
"""

from __future__ import annotations

__all__ = ["MAX_RELATIVE_CHANGE", "relaxed_correctness"]

# The 5% tolerance of ChartQA (pix2struct's ``max_relative_change`` default).
MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
    """The number ``text`` states (``"45%"`` -> 0.45), or None (pix2struct ``_to_float``)."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(
    prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE
) -> float:
    """1.0 when ``prediction`` is within ``max_relative_change`` of a numeric ``target``, else exact match.

    Args:
        prediction: the model's answer (pass it stripped: a trailing space defeats the ``%`` and string
            rules).
        target: the gold answer.
        max_relative_change: largest accepted ``|prediction - target| / |target|``.

    Returns:
        1.0 or 0.0; e.g. ``"12.5"`` for ``"12"`` is 1.0 (0.5 / 12 < 5%), ``"0.0"`` for ``"0"`` is 0.0 (zero
        target: strings compared).
    """
    predicted = _to_float(prediction)
    wanted = _to_float(target)
    if predicted is not None and wanted:  # ``wanted`` is neither None nor 0.0
        return float(abs(predicted - wanted) / abs(wanted) <= max_relative_change)
    return float(prediction.lower() == target.lower())
