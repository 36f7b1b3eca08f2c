"""The speech phase of `mm demo`: its samples (held-out pairs and phrasings), scoring and chance levels.

The phase itself runs end to end in test_demo (at a few steps) and for real in CI's
`mm demo --quick`.
"""

from __future__ import annotations

import pytest

from mm.demo.report import speech_markdown, speech_summary_rows
from mm.demo.scenes import HELDOUT_COLOUR_SHAPE
from mm.demo.speech import chance_bleu, chance_wer, qa_correct
from mm.demo.speech_data import (
    ASR_PROMPT,
    ASR_TEMPLATES,
    AST_PROMPT,
    FRENCH_TEMPLATES,
    QA_TEMPLATES,
    make_speech_samples,
    speech_messages,
    to_french,
)
from mm.demo.text_data import COLOUR_FACTS


def _pair(sample):
    words = sample.text.lower().rstrip(".").split()
    return next(
        (c, s)
        for c in ("red", "green", "blue", "yellow")
        for s in words
        if c in words and s not in (c,) and s in ("circle", "square", "triangle", "cross")
    )


def test_recognition_holds_out_colour_shape_pairs_and_phrasings():
    train = make_speech_samples(60, "asr", split="train", seed=0)
    evals = make_speech_samples(20, "asr", split="eval", seed=0)
    assert all(_pair(s) not in HELDOUT_COLOUR_SHAPE for s in train)
    assert all(_pair(s) in HELDOUT_COLOUR_SHAPE for s in evals)
    assert {s.answer for s in train} & {s.answer for s in evals} == set()
    train_forms = {t.format(colour="red", shape="cross") for t in ASR_TEMPLATES.train}
    heldout_forms = {t.format(colour="red", shape="cross") for t in ASR_TEMPLATES.heldout}
    assert not train_forms & heldout_forms
    assert sum(s.heldout_phrasing for s in evals) == 10 and not any(s.heldout_phrasing for s in train)
    assert all(s.answer == s.text for s in train + evals)
    assert len({(s.speed, s.seed) for s in train + evals}) == 80  # every utterance is said differently
    assert make_speech_samples(20, "asr", split="eval", seed=0) == evals  # deterministic
    assert make_speech_samples(20, "asr", split="eval", seed=1) != evals


def test_translation_says_the_recognition_sentences_and_answers_in_french():
    assert set(FRENCH_TEMPLATES) == set(ASR_TEMPLATES.train + ASR_TEMPLATES.heldout)
    # the colour follows the noun and agrees with its gender, as do the articles
    assert to_french("The {colour} {shape}.", "green", "cross") == "La croix verte."
    assert to_french("The {colour} {shape}.", "green", "circle") == "Le cercle vert."
    assert to_french("My {shape} is {colour}.", "blue", "cross") == "Ma croix est bleue."
    assert to_french("This is a {colour} {shape}.", "yellow", "square") == "C'est un carré jaune."
    assert to_french("One {colour} {shape}.", "red", "cross") == "Une seule croix rouge."
    with pytest.raises(ValueError, match="no French for the sentence form"):
        to_french("Two {colour} {shape}s.", "red", "cross")

    train = make_speech_samples(60, "ast", split="train", seed=0)
    evals = make_speech_samples(20, "ast", split="eval", seed=0)
    assert all(_pair(s) not in HELDOUT_COLOUR_SHAPE for s in train)
    assert all(_pair(s) in HELDOUT_COLOUR_SHAPE for s in evals)
    for s in train + evals:
        template = next(
            t
            for t in FRENCH_TEMPLATES
            if t.format(colour=_pair(s)[0], shape=_pair(s)[1]).lower() == s.text.lower()
        )
        assert s.answer == to_french(template, *_pair(s))
        assert (template in ASR_TEMPLATES.heldout) == s.heldout_phrasing
    assert sum(s.heldout_phrasing for s in evals) == 10
    content = speech_messages(train[0], "x.wav")[0]["content"]
    assert [p["type"] for p in content] == ["text", "audio"] and content[0]["text"] == AST_PROMPT
    # other seeds than recognition's: the same split says other utterances
    asr = make_speech_samples(60, "asr", split="train", seed=0)
    assert [(s.speed, s.seed) for s in asr] != [(s.speed, s.seed) for s in train]


def test_chance_bleu_is_sacrebleu_of_the_best_constant_translation():
    import sacrebleu

    refs = ["La croix verte.", "Le cercle bleu.", "La croix rouge."]
    train = ["La croix verte.", "Le carré jaune.", "La croix verte."]
    by_hand = {t: sacrebleu.corpus_bleu([t] * 3, [refs]).score for t in set(train)}
    assert chance_bleu(refs, train) == pytest.approx(max(by_hand.values()), abs=1e-12)
    assert by_hand["La croix verte."] > by_hand["Le carré jaune."]  # the maximum is over real choices
    assert chance_bleu(["Le cercle rouge."], ["Le cercle rouge."]) == pytest.approx(100.0)


def test_spoken_questions_ask_about_known_facts_in_held_out_phrasings():
    train = make_speech_samples(30, "qa", split="train", seed=0)
    evals = make_speech_samples(10, "qa", split="eval", seed=0)
    for s in train + evals:
        thing = next(t for t in COLOUR_FACTS if t in s.text.lower())
        assert s.answer == COLOUR_FACTS[thing] + "."
    assert {s.answer for s in train} == {
        c + "." for c in COLOUR_FACTS.values()
    }  # balanced blocks cover every colour
    said = {s.text for s in train}
    assert all(s.text not in said for s in evals if s.heldout_phrasing)
    heldout_starts = {t.split("{")[0] for t in QA_TEMPLATES.heldout}
    assert all(any(s.text.startswith(h) for h in heldout_starts) for s in evals if s.heldout_phrasing)
    (asr,) = make_speech_samples(1, "asr", split="train", seed=0)
    assert [p["type"] for p in speech_messages(asr, "x.wav")[0]["content"]] == ["text", "audio"]
    assert speech_messages(asr, "x.wav")[0]["content"][0]["text"] == ASR_PROMPT
    assert [p["type"] for p in speech_messages(train[0], "x.wav")[0]["content"]] == ["audio"]
    with pytest.raises(ValueError, match="task must be"):
        make_speech_samples(1, "translate", split="train", seed=0)


def test_scoring_and_chance_levels():
    (q,) = [s for s in make_speech_samples(10, "qa", split="eval", seed=0) if s.answer == "blue."][:1]
    assert qa_correct(q, "blue") and qa_correct(q, "Blue.") and qa_correct(q, "It is blue.")
    assert not qa_correct(q, "red") and not qa_correct(q, "blue or red") and not qa_correct(q, "")
    refs = ["The red cross.", "The red cross.", "A blue circle."]
    # the best constant answer: one transcript for all three, WER after Whisper's normaliser
    # ("the red cross" / "a blue circle": lower case, no full stop), counted by hand:
    # "The red cross." said thrice -> 3 substitutions of 9 words; "A blue circle." -> 6 of 9.
    assert chance_wer(refs, ["The red cross.", "A blue circle.", "A blue circle."]) == pytest.approx(3 / 9)
    assert chance_wer(refs, ["A blue circle."]) == pytest.approx(6 / 9)
    assert chance_wer(["The Red cross!"], ["the red CROSS"]) == 0.0  # case and punctuation normalised away


def test_report_sections_appear_only_with_a_speech_phase():
    assert speech_markdown({"image_qa_accuracy": 0.9}) == "" and speech_summary_rows({}) == []
    r = {
        "speech_wer": 0.25,
        "speech_wer_chance": 0.8,
        "speech_wer_heldout_phrasing": 0.3,
        "speech_asr_exact": 0.5,
        "speech_text_repeat_wer": 1.0,
        "speech_qa_accuracy": 0.75,
        "speech_qa_chance": 0.3,
        "speech_qa_heldout_phrasing": 0.7,
        "speech_qa_exact": 0.7,
        "speech_eval_samples": {"asr": 4, "qa": 4},
        "speech_seconds": {"data": 1.0, "eval": 2.0, "total": 9.0},
        "speech_examples": [
            {"task": "qa", "said": "What colour is fire?", "answer": "red.", "model": "red."}
        ],
    }
    text = speech_markdown(r)
    assert "**0.250** (chance 0.80" in text and "**0.750** (chance 0.30)" in text
    assert "| qa | What colour is fire? | red. | red. |" in text
    assert "repeating the words as text, word error rate | 1.000 |" in text
    assert "BLEU" not in text and "4 recognition, 4 questions" in text
    labels = [label for label, _ in speech_summary_rows(r)]
    assert labels[0].startswith("speech recognition WER") and not any("BLEU" in x for x in labels)
    # with a translation task
    r.update(
        speech_bleu=41.25,
        speech_bleu_chance=12.5,
        speech_bleu_heldout_phrasing=30.0,
        speech_ast_exact=0.25,
        speech_text_translate_bleu=97.0,
        speech_eval_samples={"asr": 4, "ast": 3, "qa": 4},
    )
    text = speech_markdown(r)
    assert "| speech translation BLEU | **41.2** (chance 12.5) |" in text
    assert (
        "translating the words as text, BLEU | 97.0 |" in text
        and "4 recognition, 3 translation, 4 questions" in text
    )
    rows = dict(speech_summary_rows(r))
    assert rows["speech translation BLEU (held-out pairs)"].startswith("41.2  (chance 12.5")


def test_spoken_questions_are_written_in_the_speech_qa_layout_and_scored_by_it(tmp_path):
    import math

    import torch

    from mm.datasets.audio import load_audio
    from mm.demo.eval_sets import write_speech_qa
    from mm.eval import get_task, read_task, score_predictions

    said = make_speech_samples(4, "qa", split="eval", seed=0)
    waves = [0.4 * torch.sin(torch.arange(4000 + 800 * k) * (0.05 + 0.01 * k)) for k in range(4)]
    data = write_speech_qa(said, waves, tmp_path / "speech-qa")
    samples = read_task("speech-qa", data).samples
    assert [s.id for s in samples] == ["qa-0000", "qa-0001", "qa-0002", "qa-0003"]
    assert [s.references for s in samples] == [(s.answer,) for s in said]
    for sample, wave in zip(samples, waves):
        (audio,) = sample.messages[0]["content"]  # the speech is the whole turn, as the demo trains
        heard = load_audio(audio["audio"])
        # 16-bit FLAC (written * 32767, read / 32768): the samples come back to within one step
        assert heard.shape == wave.shape and float((heard - wave).abs().max()) <= 1 / 32767
    # the metric: exact match after VQAv2's normaliser ("Blue" = "blue."; a sentence is not the answer)
    colour = said[0].answer.rstrip(".")
    answers = [colour.upper(), f"It is {colour}.", said[2].answer, "no"]
    total, _, scores = score_predictions(get_task("speech-qa"), samples, answers)
    assert scores == [1.0, 0.0, 1.0, 0.0] and math.isclose(total, 0.5)
