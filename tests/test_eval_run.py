"""`mm eval` with real (tiny, random) models: answers batched equal answers one at a time, the command writes
its files, and the text task states the backbone's promise.

Answers of a random model are junk; the tests check mechanics against independent paths (`model.chat` one
conversation at a time, a batch size of 1) and the promise (text-only prompts: the backbone's logits).
"""

from __future__ import annotations

import json

import pytest
import torch
from eval_testing import (
    tiny_model,
    tone,
    write_chartqa,
    write_clip,
    write_librispeech,
    write_text_mc,
    write_videomme,
    write_vqav2,
)

from mm import MultimodalModel
from mm.cli import main
from mm.eval import evaluate, read_task

VQAV2 = [(1000 + k, 500 + k, f"What is shown in picture {k}?", ["cat"] * 10) for k in range(5)]
TEXT = [
    {"query": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "gold": 0},
    {"question": "What colour is grass?", "choices": ["green", "purple"], "gold": 0},
    {"query": "2 + 2 = ", "choices": ["4", "5", "22"], "gold": 0},
    {"query": "Water freezes at", "choices": ["0 degrees", "100 degrees"], "gold": 0},
    {"query": "Cats say", "choices": ["meow", "woof"], "gold": 0},
]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def av_model():
    return tiny_model(av=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-model") / "model"
    tiny_model().save_pretrained(path, copy_backbone=True)
    return path


def _samples(result):
    return [(s.id, s.prediction, s.score) for s in result.samples]


def test_batched_answers_equal_one_at_a_time(model, tmp_path):
    data = write_vqav2(tmp_path, VQAV2)
    one = evaluate(model, "vqav2", data, batch_size=1, max_new_tokens=10, progress=False)
    four = evaluate(model, "vqav2", data, batch_size=4, max_new_tokens=10, progress=False)
    assert _samples(one) == _samples(four)
    assert len({s.prediction for s in one.samples}) > 1  # the images change the answers
    # and both are what model.chat answers to each conversation alone
    samples = read_task("vqav2", data).samples
    alone = [model.chat(s.messages, max_new_tokens=10, temperature=0.0).strip() for s in samples]
    assert [s.prediction for s in one.samples] == alone


def test_batched_equals_one_at_a_time_for_speech_and_video(av_model, tmp_path):
    split = write_librispeech(
        tmp_path / "ls", [(84, 121123, k, "HELLO THERE") for k in range(3)] + [(84, 121550, 0, "GOOD DAY")]
    )
    videos = write_videomme(
        tmp_path / "vme",
        [(f"vid{k}", f"{k}-1", f"What happens {k}?", ["a", "b", "c", "d"], "B") for k in range(3)],
    )
    # open-ended video QA (a JSON list, clips in videos/) and spoken QA (JSON Lines, clips in audio/)
    import soundfile as sf

    open_qa = tmp_path / "vqa" / "test_qa.json"
    records = []
    for k in range(3):
        write_clip(tmp_path / "vqa" / "videos" / f"video{k}.mp4", seed=10 + k)
        records.append({"question_id": k, "video": f"video{k}.mp4", "question": f"What {k}?", "answer": "a"})
    open_qa.write_text(json.dumps(records))
    spoken = tmp_path / "sqa" / "speech_qa.jsonl"
    (spoken.parent / "audio").mkdir(parents=True)
    lines = []
    for k in range(4):
        sf.write(spoken.parent / "audio" / f"q{k}.wav", tone(0.3 + 0.2 * k, 250 + 90 * k), 16000)
        extra = {"instruction": "Answer in one word."} if k % 2 else {}
        lines.append(json.dumps({"id": f"q{k}", "audio": f"q{k}.wav", "answer": "blue", **extra}))
    spoken.write_text("\n".join(lines) + "\n")
    cases = (("asr", split), ("video-mcq", videos), ("video-qa", open_qa), ("speech-qa", spoken))
    for task, data in cases:
        one = evaluate(av_model, task, data, batch_size=1, max_new_tokens=6, progress=False)
        three = evaluate(av_model, task, data, batch_size=3, max_new_tokens=6, progress=False)
        assert _samples(one) == _samples(three), task
        samples = read_task(task, data).samples
        alone = [av_model.chat(s.messages, max_new_tokens=6, temperature=0.0).strip() for s in samples]
        assert [s.prediction for s in one.samples] == alone, task


def test_the_command_writes_eval_json_and_md(model_dir, tmp_path, capsys):
    data = write_vqav2(tmp_path / "vqa", VQAV2)
    outs = {}
    for batch in (1, 4):
        out = tmp_path / f"out{batch}"
        argv = ["eval", str(model_dir), "vqav2", str(data), "--out", str(out), "--batch-size", str(batch)]
        assert main([*argv, "--max-new-tokens", "6", "--no-progress", "--device", "cpu"]) == 0
        outs[batch] = json.loads((out / "eval.json").read_text())
        md = (out / "eval.md").read_text()
        assert md.startswith("# mm eval: vqav2") and "| vqav2 | vqa_accuracy" in md
    report = outs[1]
    assert {"task", "score", "metric", "n", "samples"} <= set(report)
    assert (report["task"], report["metric"], report["n"]) == ("vqav2", "vqa_accuracy", len(VQAV2))
    assert report["max_new_tokens"] == 6
    assert report["model"] == str(model_dir) and report["batch_size"] == 1
    assert outs[1]["samples"] == outs[4]["samples"]  # --batch-size 1 and 4: the same answers and scores
    assert all(set(s) == {"id", "prediction", "score"} for s in report["samples"])
    assert "vqav2: vqa_accuracy" in capsys.readouterr().out

    # a malformed file fails before the model loads, naming the file and the record
    bad = write_chartqa(tmp_path / "bad", [("q?", "1")])
    bad.write_text(json.dumps([{"imgname": "1000.png", "label": "1"}]))
    assert main(["eval", str(model_dir), "chartqa", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "test_human.json: [0]: 'query' is missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_text_regression_is_identical_for_an_mm_model(model_dir, tmp_path, capsys):
    data = write_text_mc(tmp_path / "mc.jsonl", TEXT)
    out = tmp_path / "out"
    argv = ["eval", str(model_dir), "text", str(data), "--out", str(out), "--batch-size", "3"]
    assert main([*argv, "--max-new-tokens", "8", "--no-progress"]) == 0
    report = json.loads((out / "eval.json").read_text())
    regression = report["regression"]
    assert regression["identical"] is True
    assert regression["max_abs_loglikelihood_diff"] == 0.0
    assert regression["logits_identical"] and regression["answers_identical"]
    assert (regression["prompts"], regression["continuations"]) == (5, 12)
    assert report["metric"] == "acc" and report["n"] == 5 and 0.0 <= report["acc_norm"] <= 1.0
    assert "| identical | true |" in (out / "eval.md").read_text()
    assert "backbone regression: identical=true" in capsys.readouterr().out


def test_text_loglikelihoods_match_a_direct_computation(model, tmp_path):
    data = write_text_mc(tmp_path / "mc.jsonl", TEXT[:2])
    one = evaluate(model, "text", data, batch_size=1, max_new_tokens=4, progress=False)
    many = evaluate(model, "text", data, batch_size=8, max_new_tokens=4, progress=False)
    assert _samples(one) == _samples(many)
    # the first question by hand: log p(" Paris" | BOS "The capital of France is") etc., one sequence each
    tok = model.preprocessor.tokenizer
    lls = []
    for choice in TEXT[0]["choices"]:
        context = [tok.bos_id, *tok.encode(TEXT[0]["query"])]
        ids = context + tok.encode(f" {choice}")
        with torch.no_grad():
            logp = torch.log_softmax(model.backbone(torch.tensor([ids]))[0].float(), -1)
        lls.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(context), len(ids))))
    best = max(range(3), key=lambda k: (lls[k], -k))
    assert one.samples[0].prediction == TEXT[0]["choices"][best]


def test_text_regression_reports_a_model_that_breaks_the_promise(tmp_path):
    data = write_text_mc(tmp_path / "mc.jsonl", TEXT[:2])
    broken = tiny_model()
    plain = broken.forward

    def shifted(*args, **kwargs):  # a multimodal path that is not the backbone's
        out = plain(*args, **kwargs)
        return type("Out", (), {"logits": out.logits + 1e-3 * torch.arange(out.logits.shape[-1])})()

    broken.forward = shifted
    result = evaluate(broken, "text", data, batch_size=4, max_new_tokens=2, progress=False)
    regression = result.details["regression"]
    assert regression["identical"] is False and regression["logits_identical"] is False
    assert regression["max_abs_loglikelihood_diff"] > 0
    assert regression["differing_loglikelihoods"] == [0, 1]


def test_loaded_model_matches_in_memory_model(model_dir, model, tmp_path):
    data = write_chartqa(tmp_path, [("Value?", "3"), ("Trend?", "up")])
    loaded = MultimodalModel.from_pretrained(model_dir).eval()
    a = evaluate(loaded, "chartqa", data, batch_size=2, max_new_tokens=5, progress=False)
    b = evaluate(model, "chartqa", data, batch_size=2, max_new_tokens=5, progress=False)
    assert _samples(a) == _samples(b)
