"""VQA accuracy: VQAv2 (Goyal et al., CVPR 2017) and TextVQA (Singh et al., CVPR 2019).

Both benchmarks score an answer against the ten human answers of its question with the VQA accuracy of
Antol et al. (ICCV 2015, section 5): ``min(#humans who gave that answer / 3, 1)``, averaged over the ten
subsets of nine humans (leave one out), after normalising every answer.

Sources followed:

* VQAv2 — GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (commit a013f00, 2021):
  ``VQAEval.processPunctuation``, ``VQAEval.processDigitArticle`` and the accuracy loop in
  ``VQAEval.evaluate``.
* TextVQA — facebookresearch/mmf ``mmf/utils/m4c_evaluators.py``: ``TextVQAAccuracyEvaluator`` with
  ``EvalAIAnswerProcessor``, the TextVQA authors' reference evaluator. Same formula, same tables and the same
  punctuation/digit/article steps; one extra step first (``word_tokenize``: lower-case, drop every ``,`` and
  ``?``, split ``'s`` off its word), so TextVQA answers are normalised *almost* as VQAv2 answers are.

One departure from ``vqaEval.py``: when all the human answers of a question are the same string, the
official loop compares the prediction without normalising it (only ``\\n``/``\\t`` and outer spaces are
cleaned), so ``"Yes"`` scores 0 against ten ``"yes"``. mm normalises the prediction and the human answers for
every question, as the TextVQA evaluator does (Cloud-CV/VQA-Evaluation's copy of the VQA scorer, too,
normalises every prediction): a score should not depend on whether the humans happened to agree. Where the
humans disagree the two are identical; where they all agree mm can only score higher (equal strings stay
equal once normalised).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from mm.eval._vqa_tables import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION

__all__ = [
    "normalize_textvqa_answer",
    "normalize_vqa_answer",
    "normalized_exact_match",
    "textvqa_accuracy",
    "vqa_accuracy",
    "vqa_soft_accuracy",
]

# A comma between two digits ("1,000") anywhere in the text: then every punctuation mark is dropped, not
# turned into a space (vqaEval.py ``commaStrip``).
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit (so "3.5" keeps its point). vqaEval.py writes ``(?!<=\d)(\.)(?!\d)``; its
# first group is a look-*ahead* for the two characters "<=", always true in front of a period, so only
# ``(?!\d)`` acts.
_PERIOD = re.compile(r"\.(?!\d)")
# vqaEval.py passes ``re.UNICODE`` (== 32) where ``re.sub`` takes ``count``: at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, outer spaces go (vqaEval.py, first lines of the loop)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Drop or space out punctuation marks, then drop periods (vqaEval.py ``processPunctuation``).

    A mark vanishes when it sits next to a space somewhere in ``text`` ("yes / no" -> "yes  no") or when
    ``text`` holds a digit-comma-digit group ("10,000-foot" -> "10000foot"); otherwise every copy of it
    becomes a space ("x-ray" -> "x ray"). The decision looks at the input text, one mark at a time.
    """
    joined = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if joined or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """Lower-case, number words to digits, articles out, contractions in (vqaEval.py ``processDigitArticle``).

    Words are split on whitespace and joined with single spaces, which also collapses runs of spaces.
    """
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer as the official VQAv2 scorer does.

    Whitespace (``\\n``, ``\\t``, outer spaces), then punctuation, then digits/articles/contractions, as
    ``VQAEval.evaluate`` applies ``processPunctuation`` and ``processDigitArticle`` in vqaEval.py.

    Args:
        answer: a predicted or human answer.

    Returns:
        The normalised answer, e.g. ``"The Two dogs."`` -> ``"2 dogs"``, ``"1,000"`` -> ``"1000"``.
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


def normalize_textvqa_answer(answer: str) -> str:
    """Normalise an answer as the TextVQA reference evaluator does (mmf ``EvalAIAnswerProcessor.__call__``).

    First ``word_tokenize``: lower-case, remove every ``,`` and ``?``, write ``'s`` as a word of its own,
    strip; then the VQAv2 steps of :func:`normalize_vqa_answer`. (With the commas gone, the digit-comma-digit
    rule never fires, exactly as in mmf, whose comma pattern is searched after ``word_tokenize`` too.)

    Args:
        answer: a predicted or human answer.

    Returns:
        The normalised answer, e.g. ``"a,b"`` -> ``"ab"`` (VQAv2 gives ``"b"``), ``"man's"`` -> ``"man 's"``.
    """
    tokenized = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(tokenized)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str], normalize: Callable[[str], str]) -> float:
    """VQA accuracy of one prediction against the human answers, after ``normalize`` on both sides.

    For each human left out, ``min(#remaining humans whose answer equals the prediction / 3, 1)``; the score
    is the mean over the left-out humans (Antol et al. 2015, section 5; the loop over ``gtAnsDatum`` in
    vqaEval.py ``VQAEval.evaluate``; ``_compute_answer_scores`` in mmf's ``TextVQAAccuracyEvaluator``).

    Args:
        prediction: the model's answer.
        answers: the human answers (ten in VQAv2 and TextVQA; any number of at least one is accepted).
        normalize: the benchmark's answer normaliser.

    Returns:
        The accuracy in [0, 1]: 1 when at least four humans agree with the prediction, 0.9 when three do,
        0.6 when two do, 0.3 when one does (for ten humans).

    Raises:
        ValueError: when ``answers`` is empty.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    predicted = normalize(prediction)
    humans = [normalize(answer) for answer in answers]
    per_subset = [min(1.0, (humans[:i] + humans[i + 1 :]).count(predicted) / 3) for i in range(len(humans))]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against its (ten) human answers, in [0, 1].

    :func:`vqa_soft_accuracy` with :func:`normalize_vqa_answer` (vqaEval.py). The official scorer reports
    ``100 *`` the mean over questions, rounded to two decimals.
    """
    return vqa_soft_accuracy(prediction, answers, normalize_vqa_answer)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction against its (ten) human answers, in [0, 1].

    :func:`vqa_soft_accuracy` with :func:`normalize_textvqa_answer` (mmf ``TextVQAAccuracyEvaluator``).
    """
    return vqa_soft_accuracy(prediction, answers, normalize_textvqa_answer)


def normalized_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction equals one of the gold answers after :func:`normalize_vqa_answer` on both
    sides, else 0.0: the accuracy of the open-ended video and spoken QA tasks (one gold answer each).

    ActivityNet-QA and MSRVTT-QA were first scored by exact match of the answer word (later papers often
    use a GPT judge instead, which needs a network and is not reproducible; mm does not run one). Matching
    after the VQAv2 normaliser (lower case, punctuation, articles, number words to digits) keeps exact
    match but forgives form: ``"Two."`` matches ``"2"`` and ``"the park"`` matches ``"park"``.

    Raises:
        ValueError: when ``answers`` is empty.
    """
    if not answers:
        raise ValueError("exact match needs at least one gold answer")
    predicted = normalize_vqa_answer(prediction)
    return float(any(predicted == normalize_vqa_answer(answer) for answer in answers))
