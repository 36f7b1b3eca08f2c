"""mm.eval metrics against values worked out by hand from each benchmark's definition.

Every expected number is derived in the comment beside it, from the official scorer's rules (cited in the
module docstrings of mm.eval); WER and BLEU are also checked against jiwer / sacreBLEU called directly on
hand-normalised text.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from mm.eval import (
    anls,
    choice_accuracy,
    corpus_bleu,
    corpus_wer,
    extract_choice,
    extract_video_choice,
    extract_videomme_official,
    levenshtein_distance,
    mean_score,
    normalize_textvqa_answer,
    normalize_transcript,
    normalize_vqa_answer,
    option_letters,
    relaxed_correctness,
    sample_wer,
    sentence_bleu,
    textvqa_accuracy,
    vqa_accuracy,
    word_errors,
)

# ----------------------------------------------------------------------------------------------------------
# VQAv2 / TextVQA


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("The Two dogs.", "2 dogs"),  # period before the end goes, lower-case, "two" -> "2", "the" dropped
        ("1,000", "1000"),  # digit-comma-digit: marks vanish instead of becoming spaces
        ("10,000-foot", "10000foot"),  # ... and that holds for every mark of the text, "-" included
        ("x-ray", "x ray"),  # "-" touches no space: it becomes a space
        ("x-ray - maybe", "xray maybe"),  # "- " occurs: every "-" vanishes, then spaces collapse
        ("yes/no", "yes no"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("Yes\nNo\t", "yes no"),  # newline and tab are spaces
        ("dont", "don't"),  # contractions table
        ("isnt", "isn't"),
        ("Im", "im"),  # the key "Im" is never reached: words are lower-cased first
        ("it's", "it's"),  # the apostrophe is not a punctuation mark here
        ("none", "0"),  # number words: "none" counts as zero
        ("Ten", "10"),
        ("eleven", "eleven"),  # only zero to ten are mapped
        ("an apple", "apple"),
        ("?!", ""),  # all punctuation: both become spaces, nothing is left
        ("...", ""),  # periods not before a digit go
        ("", ""),
    ],
)
def test_vqa_normaliser_follows_vqaeval(answer, expected):
    assert normalize_vqa_answer(answer) == expected


def test_vqa_normaliser_removes_at_most_32_periods():
    # vqaEval.py passes re.UNICODE (32) as re.sub's count: of 40 periods, 40 - 32 = 8 remain.
    assert normalize_vqa_answer("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # m of the 10 humans gave the prediction. Leaving out one of those m leaves m-1 matches (m subsets);
        # leaving out another human leaves m (10-m subsets); each subset scores min(matches/3, 1).
        (0, 0.0),  # every subset has 0 matches
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10: leaving one out still leaves >= 3
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


def test_vqa_accuracy_number_written_as_word():
    # 3 of 10 humans said "2" and the model says "Two": normalised to "2", so 3 matches.
    # Subsets containing all three match 3/3 -> 1 (7 subsets), subsets missing one match 2/3 (3 subsets):
    # (7*1 + 3*2/3) / 10 = 0.9.
    assert vqa_accuracy("Two", ["2", "2", "2", "3", "3", "3", "3", "4", "4", "4"]) == pytest.approx(0.9)


def test_vqa_accuracy_empty_and_punctuation_predictions():
    answers = ["yes"] * 6 + ["no"] * 4
    assert vqa_accuracy("", answers) == 0.0  # "" matches no human
    assert vqa_accuracy("?!", answers) == 0.0  # normalises to ""
    assert vqa_accuracy("Yes.", answers) == 1.0  # "yes": 6 matches, every subset keeps >= 5


def test_vqa_accuracy_normalises_unanimous_answers():
    # Departure (documented in mm.eval.vqa): vqaEval.py compares raw strings when the humans all agree, which
    # would score "Yes" 0 against ten "yes". mm normalises both sides: 10 matches -> 1.0.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


@pytest.mark.parametrize(
    ("answer", "vqa", "textvqa"),
    [
        # TextVQA first drops every "," and "?", so "a,b" -> "ab"; VQAv2 spaces the comma out ("a b") and then
        # drops the article "a".
        ("a,b", "b", "ab"),
        # TextVQA writes "'s" as its own word.
        ("man's", "man's", "man 's"),
        ("Coca-Cola?", "coca cola", "coca cola"),
    ],
)
def test_textvqa_normaliser_adds_evalai_tokenisation(answer, vqa, textvqa):
    assert normalize_vqa_answer(answer) == vqa
    assert normalize_textvqa_answer(answer) == textvqa


def test_textvqa_accuracy_normalises_human_answers():
    # Humans: "Coca-Cola" twice and "coca cola" once all normalise to "coca cola" (3 matches), as does the
    # prediction "COCA COLA": (7*1 + 3*2/3) / 10 = 0.9.
    answers = ["Coca-Cola", "Coca-Cola", "coca cola"] + ["pepsi"] * 7
    assert textvqa_accuracy("COCA COLA", answers) == pytest.approx(0.9)
    # "a,b": TextVQA reads "ab", one human wrote "ab": (9*(1/3) + 1*0) / 10 = 0.3.
    assert textvqa_accuracy("a,b", ["ab"] + ["x"] * 9) == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------------------------
# DocVQA ANLS


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("ab", "ba", 2),  # no transpositions: two substitutions
        ("same", "same", 0),
    ],
)
def test_levenshtein_distance_by_hand(a, b, expected):
    assert levenshtein_distance(a, b) == expected
    assert levenshtein_distance(b, a) == expected


def test_levenshtein_distance_matches_rapidfuzz():
    from rapidfuzz.distance import Levenshtein

    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        assert levenshtein_distance(a, b) == Levenshtein.distance(a, b)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Hello World", ["hello  world"], 1.0),  # case and inner whitespace ignored: distance 0
        ("kitten", ["sitting"], 1 - 3 / 7),  # distance 3, longer string 7: NL 3/7 < 0.5
        ("ab", ["ac"], 0.5),  # NL = 1/2 exactly: the script keeps 1 - NL = 0.5 (paper: 0)
        ("abc", ["abd", "xyz"], 1 - 1 / 3),  # best gold "abd": distance 1 of 3
        ("abc", ["xyz"], 0.0),  # NL 3/3 = 1 >= 0.5: zero
        ("2 pm", ["2:00 pm", "2 pm"], 1.0),  # max over gold answers
        ("", ["abc"], 0.0),  # empty prediction: distance 3 of 3
        ("", [""], 1.0),  # both empty: length 0 -> NL 0
    ],
)
def test_anls_by_hand(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


def test_anls_divides_by_raw_lengths_like_the_official_script():
    # "abd  " vs "abc": distance on the collapsed strings is 1, but the divisor is the raw length
    # max(5, 3) = 5, so 1 - 1/5 = 0.8 (not 1 - 1/3).
    assert anls("abd  ", ["abc"]) == pytest.approx(0.8)


def test_anls_threshold_and_empty_answers():
    assert anls("kitten", ["sitting"], threshold=0.6) == 0.0  # 4/7 = 0.571 < 0.6
    with pytest.raises(ValueError):
        anls("x", [])


# ----------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("12.5", "12", 1.0),  # |12.5 - 12| / 12 = 0.0417 <= 0.05
        ("12.7", "12", 0.0),  # 0.7 / 12 = 0.0583 > 0.05
        ("105", "100", 1.0),  # 5 / 100 = 0.05: the bound is inclusive
        ("94.9", "100", 0.0),  # 5.1 / 100
        ("0.45", "45%", 1.0),  # "45%" reads 45 / 100 = 0.45
        ("45", "45%", 0.0),  # 45 vs 0.45
        ("44%", "45%", 1.0),  # 0.44 vs 0.45: 0.01 / 0.45 = 0.022
        ("0", "0", 1.0),  # zero target: no division, strings "0" == "0"
        ("0.0", "0", 0.0),  # zero target: strings differ
        ("0.01", "0", 0.0),
        (" 12 ", "12", 1.0),  # float() accepts surrounding spaces
        ("Yes", "yes", 1.0),  # non-numbers: lower-cased exact match
        ("yes ", "yes", 0.0),  # ... and nothing is stripped
        ("twelve", "12", 0.0),  # a number word is not a number
        ("", "12", 0.0),
    ],
)
def test_relaxed_correctness_by_hand(prediction, target, expected):
    assert relaxed_correctness(prediction, target) == expected


# ----------------------------------------------------------------------------------------------------------
# Multiple choice

OPTIONS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("(B)", "B"),
        ("B.", "B"),  # "." stripped from the end, then " B " found
        ("The answer is B", "B"),
        ("The answer is (C), not B", "C"),  # bracketed letters win over bare ones
        ("(A) is wrong, (C) is right", "C"),  # several in brackets: the last one
        ("A or B? I pick D", "D"),  # bare letters " A " and " D " (not "B?"): the last one
        ("I think that the picture shows a dog", "B"),  # 8 words > 5, no letter: option text "dog"
        ("It is not a cat, it is a dog", "B"),  # both texts occur: "dog" occurs last
        ("dog", None),  # option text in a short answer (1 word <= 5) does not count
        ("b) cat", None),  # lower-case letters are not letters; 2 words: no text match
        ("E", None),  # no option E among four
        ("", None),  # nothing to find (MMMU would draw a random letter)
        ("B\n", None),  # MMMU strips no whitespace: pass stripped answers
    ],
)
def test_extract_choice_follows_mmmu(response, expected):
    assert extract_choice(response, OPTIONS) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The best answer is: C.", "C"),
        ("Best answer:B", "B"),  # "Best answer:" removed, "B" stands alone
        ("The correct option is (D)", "D"),
        ("The answer is a dog", None),  # "a dog": 2 words left, too short for the text rule
    ],
)
def test_extract_video_choice_strips_videomme_prefixes(response, expected):
    assert extract_video_choice(response, OPTIONS) == expected


def test_prefix_removal_is_what_finds_the_letter():
    # Without the removal "Best answer:B" has no " B " and only 2 words: MMMU's rules find nothing.
    assert extract_choice("Best answer:B", OPTIONS) is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("C", "C"),
        ("The best answer is D.", "D"),
        ("A cat.", "A"),  # first capital A-D anywhere
        ("Best answer: C", "B"),  # official prefix list glues "Best answer:" to the next: the "B" of "Best"
        ("none of them", None),
    ],
)
def test_extract_videomme_official(response, expected):
    assert extract_videomme_official(response) == expected


def test_choice_accuracy_and_letters():
    assert option_letters(3) == ["A", "B", "C"]
    assert choice_accuracy("B", "B") == 1.0
    assert choice_accuracy("A", "B") == 0.0
    assert choice_accuracy(None, "B") == 0.0  # no extractable letter scores 0
    assert choice_accuracy(extract_choice("nothing here", OPTIONS), "A") == 0.0


# ----------------------------------------------------------------------------------------------------------
# Speech: WER and BLEU


def test_whisper_normalisation():
    assert normalize_transcript("Hello, Mr. Smith!") == "hello mister smith"
    assert normalize_transcript("I have twenty-five dollars") == "i have $25"  # numbers written as words
    assert normalize_transcript("Um, the [noise] cat sat.") == "the cat sat"  # fillers, brackets out
    assert normalize_transcript("Um.") == ""


def test_word_errors_by_hand():
    # ref "the cat sat on the mat" (6 words), hyp "the cat sit on mat": sat->sit (1 sub), one "the" deleted.
    assert word_errors("The cat sit on mat", "The cat sat on the mat.") == (2, 6)
    assert sample_wer("The cat sit on mat", "The cat sat on the mat.") == pytest.approx(2 / 6)
    # "twenty-five dollars" and "$25" normalise alike: no error.
    assert word_errors("I have $25", "I have twenty-five dollars") == (0, 3)


def test_corpus_wer_sums_edits_over_reference_words():
    import jiwer

    hyps = ["The cat sit on mat", "Hello there world"]
    refs = ["The cat sat on the mat.", "Hello, world!"]
    # (2 edits + 1 insertion "there") / (6 + 2 reference words) = 3/8; the mean of the per-sample rates would
    # be (1/3 + 1/2) / 2 = 0.4167 instead.
    assert corpus_wer(hyps, refs) == pytest.approx(3 / 8)
    direct = jiwer.wer(["the cat sat on the mat", "hello world"], ["the cat sit on mat", "hello there world"])
    assert corpus_wer(hyps, refs) == pytest.approx(direct)


def test_wer_with_empty_references():
    # "Um." normalises to "": its 3 inserted words count as errors, its 0 words add nothing to the total.
    assert word_errors("x y z", "Um.") == (3, 0)
    assert sample_wer("x y z", "Um.") == 3.0  # jiwer's convention: the insertion count
    assert sample_wer("", "Um.") == 0.0
    assert corpus_wer(["the cat sit on mat", "x y z"], ["The cat sat on the mat.", "Um."]) == pytest.approx(
        5 / 6
    )
    with pytest.raises(ValueError):
        corpus_wer(["x"], ["Um."])  # no reference word at all: undefined
    with pytest.raises(ValueError):
        corpus_wer(["a"], ["a", "b"])


def test_bleu_by_hand_and_against_sacrebleu():
    import sacrebleu

    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    # Clipped n-gram precisions: 1-grams 5/6 ("the" counted once), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3;
    # equal lengths so no brevity penalty: 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** (1/4).
    assert corpus_bleu([hyp], [ref]) == pytest.approx(100 * (1 / 12) ** 0.25)
    hyps = [hyp, "Hello there, world!"]
    refs = [ref, "Hello, world!"]
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert sentence_bleu("the cat", "the cat") == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------------------------
# Aggregation and package


def test_mean_score():
    assert mean_score([1.0, 0.0, 0.5]) == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3
    with pytest.raises(ValueError):
        mean_score([])


def test_import_is_light():
    probe = (
        "import sys, mm.eval; print(sorted(m for m in ('torch', 'jiwer', 'sacrebleu') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
