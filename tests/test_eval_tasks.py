"""`mm eval`'s tasks: each reader on files in its benchmark's published layout, each task's score from chosen
answers against values worked out by hand from the metric's definition, and bad records refused by place.

Answers are chosen, not generated: :func:`mm.eval.score_predictions` scores them, and `evaluate` is run with
its generation replaced by a fake that returns them (the generation itself is tested in test_eval_run).
Every expected number is derived in the comment beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from eval_testing import (
    picture,
    tone,
    write_ai2d,
    write_chartqa,
    write_clip,
    write_covost,
    write_docvqa,
    write_librispeech,
    write_mmmu,
    write_perception_test,
    write_text_mc,
    write_textvqa,
    write_videomme,
    write_vqav2,
)

import mm.eval.run as run
from mm.eval import (
    TASK_NAMES,
    EvalDataError,
    TaskOptions,
    evaluate,
    get_task,
    read_task,
    score_predictions,
    write_result,
)
from mm.eval.text import split_pair


def score(task, data, predictions, options=None):
    samples = read_task(task, data, options).samples
    return score_predictions(get_task(task), samples, predictions)


# ---------------------------------------------------------------------------------------- VQAv2
VQAV2 = [
    (262148000, 262148, "What colour is the bus?", ["red"] * 2 + ["blue"] * 8),
    (262148001, 262149, "How many dogs?", ["2"] * 4 + ["3"] * 6),
    (262148002, 262150, "What animal?", ["dog"] * 10),
]


def test_vqav2_reader_follows_the_official_layout(tmp_path):
    questions = write_vqav2(tmp_path, VQAV2)
    for data in (questions, tmp_path):  # the questions file, or the folder holding Questions/ Annotations/
        samples = read_task("vqav2", data).samples
        assert [s.id for s in samples] == [262148000, 262148001, 262148002]
        first = samples[0]
        assert first.references == tuple(["red"] * 2 + ["blue"] * 8)
        image, text = first.messages[0]["content"]
        assert image["image"].endswith("Images/mscoco/val2014/COCO_val2014_000000262148.jpg")
        assert text["text"] == "What colour is the bus?\nAnswer the question using a single word or phrase."
        assert first.source.endswith("questions.json: questions[0]")


def test_vqav2_scores_by_hand(tmp_path):
    data = write_vqav2(tmp_path, VQAV2)
    total, predictions, scores = score("vqav2", data, [" Red. ", "two", "cat"])
    # "Red." -> "red" matches 2 of 10 humans. Leaving out one of those 2: 1 match left -> 1/3; leaving out
    # one of the 8 others: 2 matches -> 2/3. Mean over the 10 subsets: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    # "two" -> "2" matches 4 humans: every subset keeps >= 3 of them -> 1.0.  "cat": no human -> 0.
    assert scores == pytest.approx([0.6, 1.0, 0.0])
    assert total == pytest.approx(1.6 / 3)
    assert predictions == ["Red.", "two", "cat"]  # scored and reported stripped


def test_vqav2_finds_annotations_by_option_and_refuses_without(tmp_path):
    questions = write_vqav2(tmp_path, VQAV2)
    moved = tmp_path / "elsewhere.json"
    (tmp_path / "Annotations" / "v2_mscoco_val2014_annotations.json").rename(moved)
    with pytest.raises(EvalDataError, match="--answers"):
        read_task("vqav2", questions)
    assert len(read_task("vqav2", questions, TaskOptions(answers=moved)).samples) == 3


def test_vqav2_question_without_annotation_is_refused(tmp_path):
    questions = write_vqav2(tmp_path, VQAV2)
    doc = json.loads(questions.read_text())
    doc["questions"][1]["question_id"] = 7
    questions.write_text(json.dumps(doc))
    with pytest.raises(
        EvalDataError, match=r"questions\.json: questions\[1\]: question_id 7 has no annotation"
    ):
        read_task("vqav2", questions)


# ---------------------------------------------------------------------------------------- TextVQA
TEXTVQA = [
    (34602, "0054c91397f2fe05", "what brand is this?", ["coca cola"] * 3 + ["coke"] * 7),
    (34603, "005635e119b9f32f", "what does it say?", ["hello"] * 10),
]


def test_textvqa_reader_and_scores_by_hand(tmp_path):
    data = write_textvqa(tmp_path, TEXTVQA)
    samples = read_task("textvqa", data).samples
    assert samples[0].messages[0]["content"][0]["image"].endswith("train_images/0054c91397f2fe05.jpg")
    total, _, scores = score("textvqa", data, ["Coca-Cola", "Hello,"])
    # "Coca-Cola": the "-" touches no space, so it becomes one: "coca cola", which 3 humans said. Leaving
    # one of them out: 2/3; leaving out one of the 7 others: 3/3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9.
    # "Hello,": TextVQA's tokenisation drops every "," first -> "hello" = all ten humans -> 1.0.
    assert scores == pytest.approx([0.9, 1.0])
    assert total == pytest.approx(0.95)


# ---------------------------------------------------------------------------------------- DocVQA
DOCVQA = [
    (49153, "What is the name?", ["sitting"]),
    (49154, "What is the code?", ["xyz", "abd"]),
    (49155, "Where?", ["world"]),
]


def test_docvqa_reader_and_anls_by_hand(tmp_path):
    data = write_docvqa(tmp_path, DOCVQA)
    samples = read_task("docvqa", data).samples
    assert [s.id for s in samples] == [49153, 49154, 49155]
    assert samples[0].messages[0]["content"][0]["image"].endswith("val/documents/doc0000_0.png")
    total, _, scores = score("docvqa", data, ["kitten", "ABC", "hello"])
    # kitten -> sitting: 3 edits, longer string 7 -> 1 - 3/7. ABC -> abc (lower-cased) vs abd: 1 edit of 3
    # -> 2/3 (xyz is 3 edits). hello -> world: 4 edits of 5 -> 0.2 < 0.5 -> 0.
    assert scores == pytest.approx([1 - 3 / 7, 2 / 3, 0.0])
    assert total == pytest.approx((1 - 3 / 7 + 2 / 3) / 3)


# ---------------------------------------------------------------------------------------- ChartQA
CHARTQA = [("What is the value?", "12"), ("And here?", "12"), ("Is it rising?", "yes"), ("Share?", "0.45")]


def test_chartqa_reader_and_relaxed_accuracy_by_hand(tmp_path):
    data = write_chartqa(tmp_path, CHARTQA)
    samples = read_task("chartqa", data).samples
    assert [s.id for s in samples] == ["test_human-0", "test_human-1", "test_human-2", "test_human-3"]
    assert samples[0].messages[0]["content"][0]["image"].endswith("test/png/1000.png")
    assert samples[0].messages[0]["content"][1]["text"].endswith("\nAnswer the question with a single word.")
    total, _, scores = score("chartqa", data, ["12.5", "13", "Yes", "45%"])
    # |12.5 - 12| / 12 = 4.2% <= 5% -> 1; |13 - 12| / 12 = 8.3% -> 0; "Yes" vs "yes": equal lower-cased -> 1;
    # "45%" reads as 0.45 = 0.45 -> 1.  Mean 3/4.
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert total == 0.75


# ---------------------------------------------------------------------------------------- MMMU / AI2D
def mmmu_rows():
    return [
        {
            "id": "validation_Accounting_1",
            "question": "<image 1> What is the price? Compare with <image 2>.",
            "options": ["$6", "$7", "$8"],
            "answer": "B",
            "images": {1: picture(1), 2: picture(2), 3: picture(3)},
        },
        {
            "id": "validation_Accounting_2",
            "question": "Which statement holds?",
            "options": ["Profit rises", "Profit falls", "<image 1>"],
            "answer": "A",
            "images": {1: picture(4)},
        },
        {
            "id": "validation_Accounting_3",
            "question": "How much is it?",
            "options": [],
            "answer": "42",
            "question_type": "open",
        },
    ]


def test_mmmu_reader_follows_the_parquet_columns(tmp_path):
    write_mmmu(tmp_path, "Accounting", mmmu_rows())
    loaded = read_task("mcq", tmp_path, TaskOptions(split="validation"))
    assert loaded.skipped == 1  # the open question
    first, second = loaded.samples
    assert first.id == "validation_Accounting_1" and first.references == ("B",)
    parts = first.messages[0]["content"]
    # the images the text cites, in number order (image_3 is not cited), bytes as stored, then the text
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert isinstance(parts[0]["image"], bytes)
    assert parts[2]["text"] == (
        "<image 1> What is the price? Compare with <image 2>.\nA. $6\nB. $7\nC. $8\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert len(second.messages[0]["content"]) == 2  # cited in an option
    assert second.extra["options"] == ["Profit rises", "Profit falls", "<image 1>"]


def test_mcq_scores_by_hand(tmp_path):
    write_mmmu(tmp_path / "mmmu", "Accounting", mmmu_rows())
    ai2d = write_ai2d(
        tmp_path / "ai2d", [("Which part is the leaf?", ["stem", "leaf", "root"], 1, picture(5))]
    )
    total, _, scores = score("mcq", tmp_path / "mmmu", ["(B)", "The answer is C"])
    # "(B)": a bracketed letter -> B = gold -> 1.  "The answer is C": " C " stands alone -> C, gold A -> 0.
    assert scores == [1.0, 0.0] and total == 0.5
    (sample,) = read_task("mcq", ai2d).samples
    assert sample.references == ("B",) and sample.id == "test-00000-of-00001-0"  # AI2D: index 1 -> B
    assert score("mcq", ai2d, ["B."])[2] == [1.0]  # "B." loses its period -> " B " -> B


# ---------------------------------------------------------------------------------------- video
def test_video_mcq_readers_and_scores_by_hand(tmp_path):
    videomme = write_videomme(
        tmp_path / "vme",
        [
            ("fFjv93ACGo8", "001-1", "How many balls?", ["one", "two", "three", "four"], "C"),
            ("fFjv93ACGo8", "001-2", "What colour?", ["red", "green", "blue", "black"], "A"),
        ],
    )
    samples = read_task("video-mcq", videomme).samples
    assert [s.id for s in samples] == ["001-1", "001-2"]
    video, text = samples[0].messages[0]["content"]
    assert video["video"].endswith("vme/data/fFjv93ACGo8.mp4")
    assert text["text"] == (
        "Select the best answer to the following multiple-choice question based on the video. Respond with "
        "only the letter (A, B, C, or D) of the correct option.\nHow many balls?\nA. one\nB. two\nC. three\n"
        "D. four\nThe best answer is:"
    )
    total, _, scores = score("video-mcq", videomme, ["Best answer: C", "The answer is B"])
    # "Best answer:" is a Video-MME prefix: removed -> " C " -> C = gold -> 1. "The answer is" removed ->
    # " B " -> B, gold A -> 0.
    assert scores == [1.0, 0.0] and total == 0.5

    pt = write_perception_test(
        tmp_path / "pt",
        {"video_10909": [(0, "What is the person doing?", ["running", "sitting", "jumping"], 1)]},
    )
    (sample,) = read_task("video-mcq", pt).samples
    assert sample.id == "video_10909-0" and sample.references == ("B",)
    assert "(A, B, or C)" in sample.messages[0]["content"][1]["text"]
    assert sample.messages[0]["content"][0]["video"].endswith("pt/videos/video_10909.mp4")


# ActivityNet-QA / MSRVTT-QA records: (question_id, video field, value, question, answer)
VIDEO_QA = [
    ("v_1", "video", "video7010.mp4", "How many people are there?", "2"),
    ("v_2", "video_name", "kNfn3Tc8Ikw", "Where is the man?", "in the park"),
    ("v_3", "video", "video7011.mp4", "Is it raining?", "yes"),
]


def write_video_qa(root, records, name="test_qa.json"):
    """A JSON list in the open-ended video QA layout, the clips in ``videos/`` (ActivityNet's ``v_`` names
    for ``video_name`` records)."""
    out = []
    for k, (qid, key, value, question, answer) in enumerate(records):
        file = value if key == "video" else f"v_{value}.mp4"
        if not (root / "videos" / file).exists():
            write_clip(root / "videos" / file, seed=k)
        out.append({"question_id": qid, key: value, "question": question, "answer": answer})
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text("\n".join(json.dumps(r) for r in out) if name.endswith(".jsonl") else json.dumps(out))
    return path


def test_video_qa_reader_follows_the_layout_and_scores_by_hand(tmp_path):
    data = write_video_qa(tmp_path / "anet", VIDEO_QA)
    samples = read_task("video-qa", data).samples
    assert [s.id for s in samples] == ["v_1", "v_2", "v_3"]
    assert [s.references for s in samples] == [("2",), ("in the park",), ("yes",)]
    video, text = samples[0].messages[0]["content"]
    assert video["video"].endswith("anet/videos/video7010.mp4")
    assert text["text"] == "How many people are there?\nAnswer the question using a single word or phrase."
    assert samples[1].messages[0]["content"][0]["video"].endswith("anet/videos/v_kNfn3Tc8Ikw.mp4")
    assert samples[2].source.endswith("test_qa.json: [2]")
    total, predictions, scores = score("video-qa", data, [" Two. ", "The park", "Yes, it is"])
    # "Two." -> "two" -> "2" (number word) = "2" -> 1. "The park" -> "park" but "in the park" -> "in park" -> 0.
    # "Yes, it is" -> "yes it is" != "yes" -> 0. Mean 1/3.
    assert scores == [1.0, 0.0, 0.0] and total == pytest.approx(1 / 3)
    assert predictions == ["Two.", "The park", "Yes, it is"]
    _, _, scores = score("video-qa", data, ["2", "In the park!", "YES"])
    assert scores == [1.0, 1.0, 1.0]  # "In the park!" -> "in park" = "in park"; "YES" -> "yes"

    # --prompt "" asks the question alone; JSON Lines, ids by place when a record has none, --media
    alone = read_task("video-qa", data, TaskOptions(prompt="")).samples
    assert alone[0].messages[0]["content"][1]["text"] == "How many people are there?"
    lines = tmp_path / "msrvtt" / "qa.jsonl"
    lines.parent.mkdir()
    lines.write_text(json.dumps({"video": "video7011.mp4", "question": "What?", "answer": 3}) + "\n")
    (sample,) = read_task("video-qa", lines, TaskOptions(media=tmp_path / "anet" / "videos")).samples
    assert sample.id == "qa-0" and sample.references == ("3",) and sample.source.endswith("qa.jsonl:1")


# ---------------------------------------------------------------------------------------- speech
def write_speech_qa(root, records, name="speech_qa.jsonl"):
    """AudioBench / VoiceBench style records ``{"id", "audio", "answer"[, "instruction"]}``, clips in
    ``audio/``; ``records``: dicts (a tone is written for each ``audio``)."""
    import soundfile as sf

    (root / "audio").mkdir(parents=True, exist_ok=True)
    for k, rec in enumerate(records):
        sf.write(root / "audio" / rec["audio"], tone(0.4 + 0.1 * k, 300 + 60 * k), 16000)
    path = root / name
    path.write_text(
        "\n".join(json.dumps(r) for r in records) + "\n" if name.endswith(".jsonl") else json.dumps(records)
    )
    return path


SPEECH_QA = [
    {"id": "q-0", "audio": "q-0.wav", "answer": "blue"},
    {"id": "q-1", "audio": "q-1.wav", "answer": "Blue.", "instruction": "Answer in one word."},
    {"id": "q-2", "audio": "q-2.wav", "answer": "four"},
]


def test_speech_qa_reader_follows_the_layout_and_scores_by_hand(tmp_path):
    data = write_speech_qa(tmp_path / "sqa", SPEECH_QA)
    samples = read_task("speech-qa", data).samples
    assert [s.id for s in samples] == ["q-0", "q-1", "q-2"]
    (audio,) = samples[0].messages[0]["content"]  # no instruction: the spoken question is the whole turn
    assert audio == {"type": "audio", "audio": str(tmp_path / "sqa" / "audio" / "q-0.wav")}
    text, audio = samples[1].messages[0]["content"]  # the instruction first, then the audio
    assert text == {"type": "text", "text": "Answer in one word."} and audio["audio"].endswith("q-1.wav")
    assert samples[1].source.endswith("speech_qa.jsonl:2")
    total, _, scores = score("speech-qa", data, ["Blue.", "It is blue.", " 4 "])
    # "Blue." -> "blue" = "blue" -> 1. "It is blue." -> "it is blue" != "blue" -> 0. "4" = "four" -> "4" -> 1.
    assert scores == [1.0, 0.0, 1.0] and total == pytest.approx(2 / 3)
    # --prompt is the instruction of records without their own; a JSON list reads the same
    prompted = read_task("speech-qa", data, TaskOptions(prompt="Answer briefly.")).samples
    assert [m["content"][0].get("text") for s in prompted for m in s.messages] == [
        "Answer briefly.",
        "Answer in one word.",
        "Answer briefly.",
    ]
    listed = write_speech_qa(tmp_path / "sqa2", SPEECH_QA, name="speech_qa.json")
    from_list = read_task("speech-qa", listed).samples
    assert [(s.id, s.references, s.source.split("speech_qa.json")[1]) for s in from_list] == [
        ("q-0", ("blue",), ": [0]"),
        ("q-1", ("Blue.",), ": [1]"),
        ("q-2", ("four",), ": [2]"),
    ]
    assert from_list[2].messages[0]["content"] == [
        {"type": "audio", "audio": str(listed.parent / "audio" / "q-2.wav")}
    ]


def test_librispeech_reader_and_corpus_wer_by_hand(tmp_path):
    split = write_librispeech(
        tmp_path, [(1089, 134686, 0, "HELLO WORLD"), (1089, 134686, 1, "GOOD MORNING EVERYONE")]
    )
    for data, options in ((split, None), (tmp_path / "LibriSpeech", TaskOptions(split="test-clean"))):
        samples = read_task("asr", data, options).samples
        assert [s.id for s in samples] == ["1089-134686-0000", "1089-134686-0001"]
    text, audio = samples[0].messages[0]["content"]
    assert text == {"type": "text", "text": "Repeat after me in English."}
    assert audio["audio"].endswith("1089/134686/1089-134686-0000.flac")
    total, _, scores = score("asr", split, ["Hello, world!", "good morning"])
    # Whisper's normaliser: "hello world" = reference -> 0 errors; "good morning" misses "everyone": 1
    # deletion. Corpus WER = (0 + 1) / (2 + 3) reference words = 0.2; per utterance 0 and 1/3.
    assert total == pytest.approx(0.2)
    assert scores == pytest.approx([0.0, 1 / 3])
    prompt = read_task("asr", split, TaskOptions(prompt="Transcribe:")).samples[0]
    assert prompt.messages[0]["content"][0]["text"] == "Transcribe:"


def test_covost_reader_and_corpus_bleu_by_hand(tmp_path):
    data = write_covost(
        tmp_path,
        [
            ("common_voice_fr_19733018.mp3", "le chat est assis", "the cat sat on a mat"),
            ("common_voice_fr_19733019.mp3", "un chien court", "a dog runs"),
        ],
    )
    samples = read_task("ast", data).samples
    assert [s.id for s in samples] == ["common_voice_fr_19733018.mp3", "common_voice_fr_19733019.mp3"]
    text, audio = samples[0].messages[0]["content"]
    assert text["text"] == "Translate the following sentence into English."
    assert audio["audio"].endswith("clips/common_voice_fr_19733018.mp3")
    total, _, _ = score("ast", data, ["the cat sat on the mat", "a dog runs"])
    # Clipped n-gram matches over the corpus (13a tokens, one reference each), hypothesis vs reference:
    #   1-grams: the(1 of 2, clipped) cat sat on mat = 5 of 6, plus 3 of 3  -> 8/9
    #   2-grams: the cat, cat sat, sat on = 3 of 5, plus 2 of 2             -> 5/7
    #   3-grams: the cat sat, cat sat on = 2 of 4, plus 1 of 1              -> 3/5
    #   4-grams: the cat sat on = 1 of 3, plus 0 of 0                        -> 1/3
    # equal lengths (brevity penalty 1): BLEU = 100 * (8/9 * 5/7 * 3/5 * 1/3) ** (1/4) = 100 * (8/63) ** 0.25
    assert total == pytest.approx(100 * (8 / 63) ** 0.25, abs=1e-9)


def test_covost_split_column(tmp_path):
    data = tmp_path / "covost_v2.fr_en.tsv"
    write_covost(tmp_path, [("a.mp3", "un", "one"), ("b.mp3", "deux", "two")], name=data.name)
    lines = data.read_text().splitlines()
    lines[0] += "\tsplit"
    lines[1] += "\ttest"
    lines[2] += "\ttrain"
    data.write_text("\n".join(lines) + "\n")
    assert [s.id for s in read_task("ast", data, TaskOptions(split="test")).samples] == ["a.mp3"]


# ---------------------------------------------------------------------------------------- text
def test_text_reader_accepts_lm_eval_fields(tmp_path):
    data = write_text_mc(
        tmp_path / "arc.jsonl",
        [
            {"query": "The sky is", "choices": ["blue", "green"], "gold": 0},
            {"id": "q2", "question": "What do cows drink?", "choices": ["water", "milk"], "label": 0},
            {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
        ],
    )
    samples = read_task("text", data).samples
    assert [s.id for s in samples] == [0, "q2", 2]
    assert samples[0].extra["query"] == "The sky is"
    assert samples[1].extra["query"] == "Question: What do cows drink?\nAnswer:"
    assert samples[2].references == ("4",) and samples[2].extra["gold"] == 1


def test_split_pair_moves_trailing_space_to_the_continuation():
    from mm.text_backbone import ByteTokenizer

    tok = ByteTokenizer()
    context, continuation = split_pair(tok, "Answer: ", "yes")
    assert context == [tok.bos_id, *tok.encode("Answer:")]
    assert continuation == tok.encode(" yes")


def test_text_acc_and_acc_norm_by_hand(tmp_path, monkeypatch):
    from eval_testing import tiny_model

    import mm.eval.text as text

    data = write_text_mc(
        tmp_path / "mc.jsonl",
        [
            {"query": "Pick", "choices": ["a", "bbbb"], "gold": 1},
            {"query": "Say", "choices": ["yes", "no"], "gold": 0},
        ],
    )
    chosen = [-2.0, -4.0, -1.0, -3.0]  # log-likelihood of each choice, in file order

    def fake(model, pairs, batch_size, pad_id, tick):
        assert len(pairs) == 4
        return chosen, chosen, True

    monkeypatch.setattr(text, "_loglikelihoods", fake)
    result = evaluate(tiny_model(), "text", data, batch_size=2, max_new_tokens=2, progress=False)
    # acc: argmax(-2, -4) = "a" (gold "bbbb") -> 0; argmax(-1, -3) = "yes" = gold -> 1.  acc = 1/2.
    # acc_norm divides by the choice's characters: (-2/1, -4/4) = (-2, -1) -> "bbbb" -> 1;
    # (-1/3, -3/2) -> "yes" -> 1.  acc_norm = 1.
    assert [(s.prediction, s.score) for s in result.samples] == [("a", 0.0), ("yes", 1.0)]
    assert (result.metric, result.score, result.details["acc_norm"]) == ("acc", 0.5, 1.0)


# ---------------------------------------------------------------------------------------- evaluate + files
def test_evaluate_writes_the_contract_with_chosen_answers(tmp_path, monkeypatch):
    data = write_chartqa(tmp_path / "chartqa", CHARTQA)
    answers = {"test_human-0": "12.5 ", "test_human-1": "13", "test_human-2": "Yes", "test_human-3": "45%"}

    def fake_generate(model, samples, *, batch_size, max_new_tokens, progress, desc):
        assert (batch_size, max_new_tokens) == (3, 16)  # ChartQA's default length
        return [answers[s.id] for s in samples]

    monkeypatch.setattr(run, "generate_answers", fake_generate)
    result = evaluate(object(), "chartqa", data, batch_size=3, progress=False)
    json_path, md_path = write_result(result, tmp_path / "out")
    report = json.loads(json_path.read_text())
    assert list(report)[:4] == ["task", "score", "metric", "n"] and list(report)[-1] == "samples"
    assert (report["task"], report["score"], report["metric"], report["n"]) == (
        "chartqa",
        0.75,
        "relaxed_accuracy",
        4,
    )
    assert report["samples"][0] == {"id": "test_human-0", "prediction": "12.5", "score": 1.0}
    assert all(set(s) == {"id", "prediction", "score"} for s in report["samples"])
    md = md_path.read_text()
    assert "| task | metric | score | n |" in md and "| chartqa | relaxed_accuracy" in md and "0.7500" in md
    limited = evaluate(object(), "chartqa", data, batch_size=3, progress=False, limit=2)
    assert limited.n == 2 and limited.score == 0.5


# ---------------------------------------------------------------------------------------- bad records
def _break_json(path, mutate):
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    return path


BAD = {
    "vqav2-annotation": (
        lambda tmp: (
            write_vqav2(tmp, VQAV2),
            _break_json(
                tmp / "Annotations" / "v2_mscoco_val2014_annotations.json",
                lambda d: d["annotations"][2]["answers"].clear(),
            ),
        )[0],
        "vqav2",
        r"v2_mscoco_val2014_annotations\.json: annotations\[2\]: 'answers' is empty",
    ),
    "textvqa": (
        lambda tmp: _break_json(write_textvqa(tmp, TEXTVQA), lambda d: d["data"][1].pop("answers")),
        "textvqa",
        r"TextVQA_0\.5\.1_val\.json: data\[1\]: 'answers' is missing",
    ),
    "docvqa": (
        lambda tmp: _break_json(
            write_docvqa(tmp, DOCVQA), lambda d: d["data"][2].update(image="documents/gone.png")
        ),
        "docvqa",
        r"val_v1\.0\.json: data\[2\] \(questionId 49155\): no such file .*gone\.png",
    ),
    "chartqa": (
        lambda tmp: _break_json(write_chartqa(tmp, CHARTQA), lambda d: d[1].pop("query")),
        "chartqa",
        r"test_human\.json: \[1\]: 'query' is missing",
    ),
    "video-mcq": (
        lambda tmp: _break_json(
            write_videomme(
                tmp, [("v1", "1-1", "Q?", ["a", "b", "c", "d"], "A"), ("v1", "1-2", "Q?", ["a", "b"], "E")]
            ),
            lambda d: None,
        ),
        "video-mcq",
        r"videomme\.json: \[1\]: 'answer' 'E' is neither",
    ),
    "video-qa": (
        lambda tmp: _break_json(write_video_qa(tmp, VIDEO_QA), lambda d: d[1].pop("question")),
        "video-qa",
        r"test_qa\.json: \[1\]: 'question' is missing",
    ),
    "video-qa-file": (
        lambda tmp: _break_json(write_video_qa(tmp, VIDEO_QA), lambda d: d[2].update(video="gone.mp4")),
        "video-qa",
        r"test_qa\.json: \[2\]: no such file .*videos/gone\.mp4",
    ),
    "speech-qa": (
        lambda tmp: write_speech_qa(tmp, [*SPEECH_QA[:2], {"id": "q-2", "audio": "q-2.wav", "answer": ""}]),
        "speech-qa",
        r"speech_qa\.jsonl:3: 'answer' is empty",
    ),
    "text": (
        lambda tmp: write_text_mc(
            tmp / "mc.jsonl",
            [
                {"query": "q", "choices": ["a", "b"], "gold": 0},
                {"query": "q", "choices": ["a", "b"], "gold": 2},
            ],
        ),
        "text",
        r"mc\.jsonl:2: the gold index 2 is outside the 2 choices",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_are_refused_by_file_and_place(tmp_path, case):
    make, task, message = BAD[case]
    data = make(tmp_path)
    with pytest.raises(EvalDataError, match=message):
        read_task(task, data)


def test_bad_librispeech_and_covost_lines_are_named(tmp_path):
    split = write_librispeech(tmp_path / "ls", [(61, 70968, 0, "HELLO"), (61, 70968, 1, "WORLD")])
    trans = split / "61" / "70968" / "61-70968.trans.txt"
    trans.write_text("61-70968-0000 HELLO\n61-70968-0001\n")
    with pytest.raises(EvalDataError, match=r"61-70968\.trans\.txt:2: expected 'UTTERANCE-ID TRANSCRIPT'"):
        read_task("asr", split)
    trans.write_text("61-70968-0000 HELLO\n61-70968-0009 WORLD\n")
    with pytest.raises(EvalDataError, match=r"trans\.txt:2: no such file .*61-70968-0009\.flac"):
        read_task("asr", split)
    tsv = write_covost(tmp_path / "cv", [("a.mp3", "un", "one"), ("b.mp3", "deux", "two")])
    lines = tsv.read_text().splitlines()
    lines[2] = "b.mp3\tdeux"
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        EvalDataError, match=r"covost_v2\.fr_en\.test\.tsv:3: expected 4 tab-separated fields"
    ):
        read_task("ast", tsv)


def test_bad_mmmu_row_is_named(tmp_path):
    rows = mmmu_rows()
    rows[1]["answer"] = "Z"
    path = write_mmmu(tmp_path, "Art", rows)
    with pytest.raises(
        EvalDataError, match=r"validation-00000-of-00001\.parquet: row 1: 'answer' 'Z' is neither"
    ):
        read_task("mcq", path)
    rows[1]["answer"] = "A"
    rows[1]["question"] = "See <image 4>."
    path = write_mmmu(tmp_path, "Art", rows)
    with pytest.raises(EvalDataError, match=r"row 1: the question cites 'image_4', which is empty"):
        read_task("mcq", path)


def test_options_that_mean_nothing_for_a_task_are_refused(tmp_path):
    data = write_chartqa(tmp_path, CHARTQA)
    with pytest.raises(EvalDataError, match="--split has no meaning for the task 'chartqa'"):
        read_task("chartqa", data, TaskOptions(split="test"))


def test_invalid_json_names_the_line(tmp_path):
    bad = tmp_path / "test_human.json"
    bad.write_text('[\n{"imgname": "a.png",\n "query": }\n]')
    with pytest.raises(EvalDataError, match=r"test_human\.json:3: not valid JSON"):
        read_task("chartqa", bad)


# ---------------------------------------------------------------------------------------- the command's shape
def test_every_task_has_a_reader_and_a_metric():
    assert TASK_NAMES == (
        "vqav2",
        "textvqa",
        "docvqa",
        "chartqa",
        "mcq",
        "video-mcq",
        "video-qa",
        "asr",
        "ast",
        "speech-qa",
        "text",
    )
    assert {get_task(t).metric for t in TASK_NAMES} == {
        "vqa_accuracy",
        "anls",
        "relaxed_accuracy",
        "accuracy",
        "wer",
        "bleu",
        "acc",
    }


def test_mm_eval_help_loads_no_torch():
    code = (
        "import sys\nfrom mm.cli import main\ntry:\n    main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'pandas', 'tqdm') if m in sys.modules]\nassert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
