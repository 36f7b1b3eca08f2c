"""Speaking to a saved model and hearing its answer: ``mm ask --audio`` and ``--speak``.

The model is tiny and random, so its answers are junk; the tests check the mechanics against an
independent path (the chat API on the same conversation, hibari on the same text).
"""

from __future__ import annotations

import io
import json
import math

import pytest
import soundfile as sf
import torch

from mm import ModelConfig, MultimodalModel
from mm.cli import build_parser
from mm.datasets import AudioConfig
from mm.datasets.audio import num_frames
from mm.datasets.preprocessing import AudioTokens, Preprocessor
from mm.model.chat import complete
from mm.serving.ask import ask_messages
from mm.serving.speech_out import TTS_SAMPLE_RATE, get_synthesizer, wav_bytes
from mm.text_backbone import ByteTokenizer

STOPS = (257, 264, 265)  # the tiny preset's stop ids: <|end_of_text|>, <|eom_id|>, <|eot_id|>


def speech_model(seed: int = 0) -> MultimodalModel:
    """A tiny random model with the speech path that never stops by itself (stop rows are zero)."""
    torch.manual_seed(seed)
    model = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    with torch.no_grad():
        model.backbone.lm_head.weight[list(STOPS)] = 0.0
    model.preprocessor = Preprocessor(
        ByteTokenizer(), audio=AudioConfig(), audio_tokens=AudioTokens(stack=4, conv_kernel=3, conv_stride=2)
    )
    return model


def tone_wav(hz: float, seconds: float = 0.8, rate: int = 22050) -> bytes:
    t = torch.arange(int(rate * seconds)) / rate
    return wav_bytes(0.3 * torch.sin(2 * math.pi * hz * t), rate)


def run_ask(argv):
    args = build_parser().parse_args(["ask", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech") / "model"
    speech_model(seed=1).save_pretrained(folder, copy_backbone=True)
    return folder


def test_ask_messages_put_speech_after_the_question():
    assert ask_messages("", audios=["q.wav"]) == [
        {"role": "user", "content": [{"type": "audio", "audio": "q.wav"}]}
    ]
    assert ask_messages("Repeat after me in English.", audios=["q.wav"])[0]["content"] == [
        {"type": "text", "text": "Repeat after me in English."},
        {"type": "audio", "audio": "q.wav"},
    ]


def test_mm_ask_answers_a_spoken_question(saved, tmp_path, capsys):
    (tmp_path / "q.wav").write_bytes(tone_wav(440.0))
    (tmp_path / "other.wav").write_bytes(tone_wav(1500.0, seconds=1.3))
    loaded = MultimodalModel.from_pretrained(saved).eval()
    expected = complete(loaded, ask_messages("", audios=[str(tmp_path / "q.wav")]), max_new_tokens=7)
    other = complete(loaded, ask_messages("", audios=[str(tmp_path / "other.wav")]), max_new_tokens=7)
    # each clip became as many placeholders as the speech adapter emits for it (one per 80 ms)
    pre = loaded.preprocessor
    placeholders = [pre.audio_tokens.count(num_frames(int(16000 * s))) for s in (0.8, 1.3)]
    assert other.prompt_tokens - expected.prompt_tokens == placeholders[1] - placeholders[0] > 0

    argv = ["--model", str(saved), "--max-new-tokens", "7"]
    assert run_ask([*argv, "--audio", str(tmp_path / "q.wav"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["answer"], out["tokens"]) == (expected.text, 7)
    assert out["prompt_tokens"] == expected.prompt_tokens

    assert run_ask([*argv, "--audio", str(tmp_path / "q.wav")]) == 0  # streamed
    assert capsys.readouterr().out == expected.text + "\n"


def test_mm_ask_speaks_the_answer(saved, tmp_path, capsys):
    (tmp_path / "q.wav").write_bytes(tone_wav(440.0))
    out_wav = tmp_path / "answer.wav"
    argv = ["--model", str(saved), "--max-new-tokens", "5", "--audio", str(tmp_path / "q.wav")]
    assert run_ask([*argv, "--speak", str(out_wav), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speech"] == str(out_wav)
    samples, rate = sf.read(out_wav, dtype="float32")
    assert rate == TTS_SAMPLE_RATE and samples.ndim == 1
    # the file is hibari's bundled voice saying the answer (at least the minimum length of silence)
    reference, _ = sf.read(io.BytesIO(get_synthesizer().wav(out["answer"], min_seconds=0.1)), dtype="float32")
    assert samples.shape == reference.shape and (samples == reference).all()


def test_mm_ask_rejects_bad_speech_and_a_missing_question(saved, tmp_path, capsys):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file" * 10)
    out_wav = tmp_path / "out.wav"
    # --speak asks for a spoken answer: a question refused must leave no answer file behind
    argv = ["--model", str(saved), "--max-new-tokens", "3", "--speak", str(out_wav)]
    assert run_ask([*argv, "--audio", str(tmp_path / "bad.wav")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm ask: ") and "bad.wav" in err  # names the file
    assert "corrupt" in err or "unsupported" in err  # and says what is wrong with it
    assert run_ask([*argv, "--audio", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err
    assert run_ask(argv) == 2
    assert "give a QUESTION" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav"]  # no out.wav, no .out.wav.tmp
