"""`mm demo` end to end at a few steps per phase: the pipeline, the report, and the saved model.

The accuracy the demo reaches is checked by CI's `mm demo --quick --require-accuracy` run (see
`.ci/run`), which trains for real; here only the mechanics and the promises are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mm.demo.run import DemoSettings, run_demo
from mm.demo.speech import SpeechDemoSettings
from mm.demo.video import VideoDemoSettings

MICRO = DemoSettings(
    text_docs=60,
    text_steps=4,
    text_batch=4,
    text_seq_len=64,
    encoder_samples=40,
    encoder_steps=3,
    caption_samples=24,
    qa_samples=48,
    eval_samples=8,
    pretrain_steps=4,
    anneal_steps=3,
    speech_text_steps=5,  # with speech, the text model trains this long (with "Repeat after me" turns)
)
VIDEO_MICRO = VideoDemoSettings(train_clips=8, eval_clips=4, steps=2)
SPEECH_MICRO = SpeechDemoSettings(
    asr_train=8, qa_train=8, asr_eval=4, qa_eval=4, ast_train=4, ast_eval=3, pretrain_steps=2, sft_steps=2
)


def test_demo_pipeline_keeps_the_backbone_and_saves_a_servable_model(tmp_path, capsys):
    report = run_demo(
        tmp_path / "out",
        settings=MICRO,
        video_settings=VIDEO_MICRO,
        speech_settings=SPEECH_MICRO,
        progress=False,
    )
    for key in (
        "text_ppl_before",
        "text_ppl_after",
        "backbone_digest_before",
        "backbone_digest_after",
        "image_qa_accuracy",
        "image_qa_chance",
        "video_qa_accuracy",
        "video_qa_chance",
        "video_qa_per_kind",
        "video_timings",
        "speech_wer",
        "speech_wer_chance",
        "speech_qa_accuracy",
        "speech_qa_chance",
        "stages",
    ):
        assert key in report
    assert report["backbone_digest_before"] == report["backbone_digest_after"]
    assert report["text_ppl_before"] == report["text_ppl_after"]  # exactly: the same logits
    assert report["image_qa_chance"] == 0.25 and 0.0 <= report["image_qa_accuracy"] <= 1.0
    names = [s["name"] for s in report["stages"]]
    assert names == [
        "text-backbone",
        "image-encoder",
        "image-pretrain",
        "image-anneal",
        "video-adapter",
        "speech-pretrain",
        "speech-sft",
    ]
    assert [s["steps"] for s in report["stages"]] == [5, 3, 4, 3, 2, 2, 2]
    assert report["video_qa_chance"] == 0.25 and 0.0 <= report["video_qa_accuracy"] <= 1.0
    assert report["video_qa_eval_samples"] == 4 and report["video_data"]["cached_videos"] == 8
    assert report["speech_eval_samples"] == {"asr": 4, "ast": 3, "qa": 4} and report["speech_wer"] >= 0.0
    assert 0.25 <= report["speech_qa_chance"] <= 1.0 and 0.0 <= report["speech_qa_accuracy"] <= 1.0
    assert (
        report["speech_data"]["speech"]["samples"] == 20
    )  # the three tasks, interleaved in one shard folder
    assert report["speech_data"]["speech"]["per_task"] == {"asr": 8, "ast": 4, "qa": 8}
    assert 0.0 <= report["speech_bleu"] <= 100.0 and 0.0 <= report["speech_bleu_chance"] <= 100.0
    assert len(report["speech_text_translate_examples"]) == 3
    assert [e["task"] for e in report["speech_examples"]] == ["asr"] * 4 + ["ast"] * 3 + ["qa"] * 4
    assert report["speech_text_repeat_wer"] >= 0.0 and len(report["speech_text_repeat_examples"]) == 4
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    plots = ("text-backbone", "image-encoder", "image-stages", "video-stage", "speech-stages")
    for f in ("report.md", *(f"plots/{p}.png" for p in plots)):
        assert (out / f).is_file(), f
    # Every trainer stage (all but the text backbone and image encoder pre-training) wrote its loss
    # curve, metrics and a checkpoint; the data went through shards.
    for stage in names[2:]:
        assert (out / "runs" / stage / "loss.png").is_file()
    assert "video QA accuracy" in (out / "report.md").read_text()
    assert report["data"]["qa"]["samples"] == 48 and report["data"]["captions"]["samples"] == 24

    # The saved model answers through `mm ask` (the README's second command).
    from mm.demo.data import make_image_qa

    (sample,) = make_image_qa(1, split="eval", seed=5)
    sample.image.save(tmp_path / "q.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mm.cli",
            "ask",
            "--model",
            str(out / "model"),
            "--image",
            str(tmp_path / "q.png"),
            "--max-new-tokens",
            "6",
            "--json",
            sample.question,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert isinstance(answer["answer"], str) and answer["tokens"] <= 6

    # ... and about a video (the held-out clips the demo wrote), through `mm ask --video`.
    from mm.cli import main

    clip = sorted((out / "raw-video" / "eval").glob("*.mp4"))[0]
    argv = ["ask", "--model", str(out / "model"), "--video", str(clip), "--max-new-tokens", "6", "--json"]
    assert main([*argv, "Which way does the shape move?"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] <= 6

    # ... and to a spoken question (a recording the speech phase synthesised), through `mm ask --audio`.
    spoken = sorted((out / "raw" / "speech").glob("qa-*.wav"))[0]
    argv = ["ask", "--model", str(out / "model"), "--audio", str(spoken), "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] <= 6

    # Text-only logits of the saved model are the backbone's, bit for bit.
    from mm import MultimodalModel

    model = MultimodalModel.from_pretrained(out / "model")
    ids = torch.tensor([model.preprocessor.tokenizer.encode("A red circle in the top left.", bos=True)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.backbone(ids))


def test_demo_refuses_contradicting_requirements_before_training(tmp_path, capsys):
    from mm.cli import main

    out = tmp_path / "never-written"
    assert main(["demo", "--out", str(out), "--require-speech-qa-accuracy", "0.5"]) == 2
    assert "--require-speech-qa-accuracy needs --speech" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--require-speech-wer", "0.6"]) == 2
    assert "--require-speech-wer needs --speech" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--require-speech-bleu", "30"]) == 2
    assert "--require-speech-bleu needs --speech" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--no-video", "--require-video-accuracy", "0.4"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert not out.exists()


def test_sentence_turns_repeat_or_translate_the_words_and_answer_with_them():
    import random

    from mm.demo.data import COLOURS, SHAPES
    from mm.demo.run import _token_stream, sentence_turn
    from mm.demo.speech import ASR_PROMPT, AST_PROMPT, FRENCH_TEMPLATES, to_french
    from mm.text_backbone import ByteTokenizer

    def capital(text):
        return text[0].upper() + text[1:]

    french = {
        capital(t.format(colour=c, shape=s)): to_french(t, c, s)
        for t in FRENCH_TEMPLATES
        for c in COLOURS
        for s in SHAPES
    }
    tok = ByteTokenizer()
    rng = random.Random(0)
    for task, prompt in (("asr", ASR_PROMPT), ("ast", AST_PROMPT)):
        for _ in range(20):
            text = tok.decode(sentence_turn(tok, rng, task))
            said = text.split(f"{prompt} ", 1)[1].split("<|eot_id|>", 1)[0]
            answer = said if task == "asr" else french[said]  # every turn says one of the sentences
            assert text.endswith(f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>")
    with pytest.raises(ValueError, match="task must be"):
        sentence_turn(tok, rng, "qa")
    docs = ["A red circle is at the top left.\nWhat colour is the circle? red"] * 80
    plain = tok.decode(_token_stream(docs, tok, seed=1).tolist())
    assert ASR_PROMPT not in plain and AST_PROMPT not in plain
    assert torch.equal(
        _token_stream(docs, tok, repeat_share=0.5, seed=1), _token_stream(docs, tok, repeat_share=0.5, seed=1)
    )
    mixed = tok.decode(_token_stream(docs, tok, repeat_share=0.5, seed=1).tolist())
    assert (
        20 <= mixed.count(ASR_PROMPT) <= 60
        and "What colour is the circle?" in mixed
        and AST_PROMPT not in mixed
    )
    both = tok.decode(_token_stream(docs, tok, repeat_share=0.3, translate_share=0.3, seed=1).tolist())
    assert 10 <= both.count(ASR_PROMPT) <= 40 and 10 <= both.count(AST_PROMPT) <= 40
    assert "What colour is the circle?" in both


def test_demo_requirements_name_each_unmet_figure_with_its_chance():
    from mm.cli import build_parser
    from mm.demo.run import unmet_requirements

    report = {
        "image_qa_accuracy": 0.9,
        "image_qa_chance": 0.25,
        "video_qa_accuracy": 0.4,
        "video_qa_chance": 0.25,
        "speech_qa_accuracy": 0.7,
        "speech_qa_chance": 0.3,
        "speech_wer": 0.62,
        "speech_wer_chance": 0.77,
        "speech_bleu": 35.0,
        "speech_bleu_chance": 9.5,
    }
    argv = ["demo", "--speech", "--require-accuracy", "0.75", "--require-video-accuracy", "0.45"]
    args = build_parser().parse_args(
        [
            *argv,
            "--require-speech-qa-accuracy",
            "0.6",
            "--require-speech-wer",
            "0.5",
            "--require-speech-bleu",
            "40",
        ]
    )
    assert unmet_requirements(args, report) == [
        "video QA accuracy 0.400 is below the required 0.450 (chance 0.250)",
        "recognition word error rate 0.620 is above the allowed 0.500 (chance 0.770)",
        "speech translation BLEU 35.000 is below the required 40.000 (chance 9.500)",
    ]
    met = build_parser().parse_args([*argv[:4], "--require-speech-wer", "0.62"])  # equal is met
    assert unmet_requirements(met, report) == []
    assert unmet_requirements(build_parser().parse_args(["demo"]), report) == []
