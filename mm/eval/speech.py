"""Speech metrics: word error rate for recognition, BLEU for translation.

WER follows Whisper's evaluation (Radford et al., "Robust Speech Recognition via Large-Scale Weak
Supervision", ICML 2023: "Evaluation Metrics" and appendix C, "Text Standardization"; openai/whisper
``notebooks/LibriSpeech.ipynb``, which calls ``jiwer.wer`` on the normalised lists): references
and hypotheses both go through Whisper's English normaliser (``EnglishTextNormalizer``, here from the
``whisper-normalizer`` package, a copy of openai/whisper ``whisper/normalizers/english.py``), then ``jiwer``
computes corpus WER = (substitutions + deletions + insertions) / reference words, summed over the corpus
(not a mean of per-utterance rates).

Empty references: the normaliser empties some references (``"Um."`` -> ``""``: fillers are removed). Such an
utterance adds its inserted words to the errors and no words to the total, as ``jiwer`` (4.x; 3.x refused
empty references) counts it. When every
reference of a corpus is empty the rate is undefined and :func:`corpus_wer` raises (``jiwer`` would return
the bare insertion count). For one utterance, :func:`sample_wer` keeps ``jiwer``'s convention (the number of
inserted words); :func:`word_errors` gives the two counts behind every rate.

BLEU (Papineni et al., ACL 2002) is ``sacrebleu.corpus_bleu`` (Post, WMT 2018) with its defaults: 13a
tokenisation, case-sensitive, one reference per sample, score on 0-100. Text goes in as written: the
English normaliser is not applied, since translation targets need not be English and sacreBLEU's signature
assumes detokenised raw text.

``jiwer``, ``sacrebleu`` and ``whisper_normalizer`` are imported on first use, so ``import mm.eval`` stays
light.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

__all__ = ["corpus_bleu", "corpus_wer", "normalize_transcript", "sample_wer", "sentence_bleu", "word_errors"]


@functools.cache
def _english_normalizer() -> Callable[[str], str]:
    """One shared Whisper ``EnglishTextNormalizer`` (it reads a spelling table when built)."""
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_transcript(text: str) -> str:
    """Whisper's English normalisation of a transcript.

    Lower-case, remove bracketed spans, fillers and most punctuation, standardise spelling (British to
    American), numbers (``"twenty-five dollars"`` -> ``"$25"``) and titles (``"Mr."`` -> ``"mister"``).

    Args:
        text: a reference or hypothesis transcript.

    Returns:
        The normalised transcript, e.g. ``"Hello, Mr. Smith!"`` -> ``"hello mister smith"``.
    """
    return _english_normalizer()(text)


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("no samples to score")


def word_errors(hypothesis: str, reference: str) -> tuple[int, int]:
    """Word edits and reference words of one utterance, both normalised.

    Args:
        hypothesis: the model's transcript.
        reference: the gold transcript.

    Returns:
        ``(substitutions + deletions + insertions, reference words)``; summed over a corpus, their ratio is
        :func:`corpus_wer`.
    """
    import jiwer

    out = jiwer.process_words(normalize_transcript(reference), normalize_transcript(hypothesis))
    return out.substitutions + out.deletions + out.insertions, out.hits + out.substitutions + out.deletions


def sample_wer(hypothesis: str, reference: str) -> float:
    """WER of one utterance after Whisper normalisation (``jiwer.wer`` on the normalised pair).

    For listing: the corpus WER is not the mean of these. An empty normalised reference gives the number of
    inserted words (0.0 when the hypothesis is empty too), ``jiwer``'s convention.
    """
    import jiwer

    return float(jiwer.wer(normalize_transcript(reference), normalize_transcript(hypothesis)))


def corpus_wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate after Whisper normalisation: total edits / total reference words.

    Args:
        hypotheses: the model's transcripts.
        references: the gold transcripts, in the same order.

    Returns:
        The rate as a fraction (0.05 is 5% WER); above 1 when insertions outnumber reference words.

    Raises:
        ValueError: on unequal lengths, no samples, or no reference word at all after normalisation.
    """
    import jiwer

    _check_pairs(hypotheses, references)
    normalized_refs = [normalize_transcript(text) for text in references]
    if not any(ref.split() for ref in normalized_refs):
        raise ValueError("WER is undefined: no reference has a word left after normalisation")
    normalized_hyps = [normalize_transcript(text) for text in hypotheses]
    return float(jiwer.wer(normalized_refs, normalized_hyps))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU on 0-100: ``sacrebleu.corpus_bleu`` with its defaults (13a tokenisation), raw text.

    Args:
        hypotheses: the model's translations.
        references: one gold translation per sample, in the same order.

    Raises:
        ValueError: on unequal lengths or no samples.
    """
    import sacrebleu

    _check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """BLEU of one sample on 0-100 (``sacrebleu.sentence_bleu``, its default exponential smoothing).

    For listing: the corpus BLEU is not the mean of these.
    """
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)
