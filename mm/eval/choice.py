"""Multiple choice: the option letter a free-form answer names, and its score.

Image benchmarks (MMMU, Yue et al., CVPR 2024; AI2D) and video benchmarks (Video-MME, Fu et al., 2024;
PerceptionTest, Patraucean et al., NeurIPS 2023) ask the model to name one of the lettered options. The
score of a question is 1 when the letter extracted from the answer is the gold letter, else 0; the dataset
score is the mean (:func:`mm.eval.mean_score`).

Source followed: MMMU-Benchmark/MMMU ``mmmu/utils/eval_utils.py`` (formerly ``eval/eval_utils.py``),
``parse_multi_choice_response`` (extraction) and ``eval_multi_choice`` (score). Options are lettered ``A``,
``B``, ... in order, as MMMU's ``get_multi_choice_info`` does. The rules, in order:

1. Strip ``, . ! ? ; : '`` from both ends (one character kind after the other, as MMMU does) and pad the
   answer with a space on each side.
2. Letters written in parentheses, ``(B)``; else letters standing alone between spaces, `` B ``. Upper-case
   only: ``"b) cat"`` names no letter.
3. Else, when the answer has more than five words, options whose text occurs in it (case-insensitive).
4. Several candidates: the one whose mark (or option text) occurs last; on a tie, the earlier letter.

Departure: where MMMU finds nothing it draws a random letter (``random.choice`` with seed 42). mm returns
None, which scores 0. A score must not depend on a random draw or on how many questions came before (the
seeded generator advances per unparsed answer), and a model that names no option should not earn the
1-in-n chance: mm's accuracy is reproducible and never above MMMU's expectation.

Video answers first lose the answer prefixes of Video-MME's ``extract_characters_regex``
(BradyFU/Video-MME ``evaluation/eval_your_results.py``, last at commit 4e7566d before its removal from the
repository), then follow the same rules (:func:`extract_video_choice`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "VIDEO_ANSWER_PREFIXES",
    "choice_accuracy",
    "extract_choice",
    "extract_video_choice",
    "extract_videomme_official",
    "option_letters",
]

# Stripped from both ends of an answer, one after the other (MMMU ``parse_multi_choice_response``).
_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")
# Answers with more than this many words may name an option by its text (MMMU's content rule).
_MIN_WORDS_FOR_TEXT = 5

# The answer prefixes Video-MME removes, as its authors listed them. In the official list two pairs lack
# the comma between them, so Python glues them into "The best option isThe correct option is" and
# "Best answer:Best option:", which never occur: the official script strips neither "The correct option
# is", "Best answer:" nor "Best option:" on its own. mm strips all eight, as intended.
VIDEO_ANSWER_PREFIXES: tuple[str, ...] = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)
# The same list as the official script reads it (see above), for :func:`extract_videomme_official`.
_VIDEOMME_OFFICIAL_PREFIXES: tuple[str, ...] = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)
_VIDEOMME_LETTER = re.compile("[ABCD]")


def option_letters(num_options: int) -> list[str]:
    """The letters of ``num_options`` options: ``["A", "B", ...]`` (MMMU ``get_multi_choice_info``)."""
    return [chr(ord("A") + i) for i in range(num_options)]


def _last(candidates: list[str], position: dict[str, int]) -> str:
    """The candidate at the largest position; the first such candidate on a tie (as ``np.argmax``)."""
    return max(candidates, key=lambda letter: position[letter])


def extract_choice(response: str, options: Sequence[str]) -> str | None:
    """The option letter a free-form answer names, by MMMU's rules (module docstring), or None.

    Args:
        response: the model's answer (pass it stripped: MMMU strips no whitespace, so ``"B\\n"`` names
            nothing).
        options: the option texts, in order; they are lettered A, B, ...

    Returns:
        The letter, e.g. ``"B"`` for ``"(B)"``, ``"B."`` or ``"The answer is B"``; None when no rule
        finds one (MMMU would draw a random letter).
    """
    letters = option_letters(len(options))
    text = response
    for mark in _EDGE_MARKS:
        text = text.strip(mark)
    text = f" {text} "

    bracketed = {letter: text.rfind(f"({letter})") for letter in letters if f"({letter})" in text}
    if bracketed:
        return _last(list(bracketed), bracketed)
    alone = {letter: text.rfind(f" {letter} ") for letter in letters if f" {letter} " in text}
    if alone:
        return _last(list(alone), alone)
    if len(text.split()) > _MIN_WORDS_FOR_TEXT:
        lowered = text.lower()
        named = {
            letter: lowered.rfind(option.lower())
            for letter, option in zip(letters, options)
            if option.lower() in lowered
        }
        if named:
            return _last(list(named), named)
    return None


def extract_video_choice(response: str, options: Sequence[str]) -> str | None:
    """The option letter of a video answer: Video-MME's answer prefixes removed, then :func:`extract_choice`.

    Each of :data:`VIDEO_ANSWER_PREFIXES` is removed wherever it occurs (case-sensitive), as Video-MME's
    ``extract_characters_regex`` does; this lets ``"Best answer:B"`` name B. The word count of MMMU's
    content rule is taken after the removal.

    Args:
        response: the model's answer, stripped.
        options: the option texts, in order; they are lettered A, B, ...

    Returns:
        The letter, or None when no rule finds one.
    """
    for prefix in VIDEO_ANSWER_PREFIXES:
        response = response.replace(prefix, "")
    return extract_choice(response, options)


def extract_videomme_official(response: str) -> str | None:
    """The letter Video-MME's own script reads from an answer, for comparison with published numbers.

    BradyFU/Video-MME ``evaluation/eval_your_results.py`` (commit 4e7566d), ``extract_characters_regex``:
    strip, remove the prefixes (with the official list's glued pairs, see :data:`VIDEO_ANSWER_PREFIXES`),
    then take the *first* capital A, B, C or D anywhere, so ``"A cat"`` names A and ``"Best answer: C"``
    names B. Two differences from :func:`extract_video_choice` matter for scores: this rule finds a letter
    far more often, and the official script leaves questions whose answer names none out of the
    denominator, where mm counts them as wrong.

    Args:
        response: the model's answer.

    Returns:
        ``"A"`` to ``"D"``, or None where the official script returns ``""``.
    """
    text = response.strip()
    for prefix in _VIDEOMME_OFFICIAL_PREFIXES:
        text = text.replace(prefix, "")
    # The script's "more than ten words and no capital A-D" exit returns what the search below returns
    # anyway (nothing), so the search alone decides.
    found = _VIDEOMME_LETTER.search(text)
    return None if found is None else found.group(0)


def choice_accuracy(predicted: str | None, answer: str) -> float:
    """1.0 when the extracted letter is the gold letter, else 0.0 (MMMU ``eval_multi_choice``).

    Args:
        predicted: the letter from :func:`extract_choice` (None, for no letter, scores 0).
        answer: the gold letter.
    """
    return float(predicted is not None and predicted == answer)
