"""Speech through `mm serve`: OpenAI's ``input_audio`` parts in, spoken answers out
(``modalities: ["text", "audio"]``), driven by the official `openai` client.

The served model is tiny and random with the speech path; expected answers come from `mm.model.chat` on
a separately loaded copy, spoken answers from hibari's bundled voice on the same text.
"""

from __future__ import annotations

import base64
import io
import math
import os

import av
import openai
import pytest
import soundfile as sf
import torch
from test_server import MODEL_ID, RunningServer, text, user_parts

from mm import ModelConfig, MultimodalModel
from mm.datasets import AudioConfig
from mm.datasets.audio import load_audio, num_frames
from mm.datasets.preprocessing import AudioTokens, Preprocessor
from mm.model.chat import chat, encode_conversation
from mm.serving.app import ServerLimits, create_app
from mm.serving.speech_out import TTS_SAMPLE_RATE, get_synthesizer, wav_bytes
from mm.text_backbone import ByteTokenizer

LIMITS = ServerLimits(max_request_bytes=400_000, max_media_bytes=150_000, max_tokens=64, max_batch_size=4)


def tone(hz: float, seconds: float, rate: int = 16000) -> torch.Tensor:
    t = torch.arange(int(rate * seconds)) / rate
    return 0.3 * torch.sin(2 * math.pi * hz * t)


def wav(hz: float = 440.0, seconds: float = 0.8, rate: int = 16000) -> bytes:
    return wav_bytes(tone(hz, seconds, rate), rate)


def mp3(hz: float = 440.0, seconds: float = 0.8, rate: int = 22050) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="mono")
        samples = (tone(hz, seconds, rate).numpy() * 32767).astype("int16")[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def input_audio(raw: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


@pytest.fixture(scope="module")
def speech_model_dir(tmp_path_factory):
    return save_speech_model(tmp_path_factory.mktemp("served-speech") / "model")


def save_speech_model(path):
    """A tiny-av model with the speech path (at most 3 s of audio) that never stops by itself."""
    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    with torch.no_grad():
        model.backbone.lm_head.weight[[257, 264, 265]] = 0.0
    model.preprocessor = Preprocessor(
        ByteTokenizer(),
        audio=AudioConfig(max_seconds=3.0),
        audio_tokens=AudioTokens(stack=4, conv_kernel=3, conv_stride=2),
    )
    model.save_pretrained(path, copy_backbone=True)
    return path


@pytest.fixture(scope="module")
def ref(speech_model_dir):
    return MultimodalModel.from_pretrained(speech_model_dir).eval()


@pytest.fixture(scope="module")
def speech_server(speech_model_dir):
    app = create_app(
        MultimodalModel.from_pretrained(speech_model_dir).eval(), model_id=MODEL_ID, limits=LIMITS
    )
    running = RunningServer(app)
    yield running
    running.stop()


def test_input_audio_answers_as_model_chat_does(speech_server, ref):
    pre = ref.preprocessor
    text_only = len(
        encode_conversation(ref, [{"role": "user", "content": [text("Repeat after me in English.")]}]).ids
    )
    for raw, fmt in ((wav(440.0), "wav"), (mp3(900.0, 1.1), "mp3")):
        messages = [{"role": "user", "content": [text("Repeat after me in English."), input_audio(raw, fmt)]}]
        r = speech_server.client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8)
        mine = [
            {
                "role": "user",
                "content": [text("Repeat after me in English."), {"type": "audio", "audio": raw}],
            }
        ]
        assert r.choices[0].message.content == chat(ref, mine, max_new_tokens=8)
        assert r.choices[0].message.audio is None  # text only unless asked
        # the prompt holds one placeholder per 80 ms of speech besides the chat tokens
        placeholders = pre.audio_tokens.count(
            num_frames(load_audio(raw, config=pre.audio).numel(), pre.audio)
        )
        assert placeholders > 0 and r.usage.prompt_tokens == text_only + placeholders
    status, body = speech_server.request("GET", "/health")
    assert body["limits"]["max_audios"] == 1 and body["limits"]["max_audio_seconds"] == 3.0


def test_spoken_answer_with_modalities_text_and_audio(speech_server, ref):
    messages = [{"role": "user", "content": [input_audio(wav(300.0))]}]
    r = speech_server.client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=6,
        modalities=["text", "audio"],
        audio={"voice": "heart", "format": "wav"},
    )
    message = r.choices[0].message
    assert message.content == chat(
        ref, [{"role": "user", "content": [{"type": "audio", "audio": wav(300.0)}]}], max_new_tokens=6
    )
    assert message.audio.transcript == message.content and message.audio.id.startswith("audio_")
    raw = base64.b64decode(message.audio.data)
    samples, rate = sf.read(io.BytesIO(raw), dtype="float32")
    assert rate == TTS_SAMPLE_RATE and samples.ndim == 1
    assert raw == get_synthesizer().wav(message.content, min_seconds=0.1)  # hibari's bundled voice


BAD_AUDIO = [
    (input_audio(wav()[: len(wav()) // 2]), "invalid_audio", "truncated"),
    (input_audio(b"RIFF....WAVEfmt nothing useful here" * 4), "invalid_audio", "messages[0].content[1]"),
    (input_audio(b"not audio at all" * 20, "mp3"), "invalid_audio", "messages[0].content[1]"),
    (input_audio(wav(), "flac"), "invalid_part", "format 'flac' is not supported"),
    ({"type": "input_audio", "input_audio": {"format": "wav"}}, "invalid_part", "needs 'input_audio'"),
    (
        {"type": "input_audio", "input_audio": {"data": "%%%not base64", "format": "wav"}},
        "invalid_data_uri",
        "base64",
    ),
    (input_audio(os.urandom(160_000)), "media_too_large", "max_media_bytes"),
    (input_audio(wav(seconds=4.0, rate=8000)), "audio_too_large", "max_seconds"),
    ({"type": "audio", "audio": "/etc/passwd"}, "invalid_part", "name files are not accepted"),
]


@pytest.mark.parametrize(("part", "code", "words"), BAD_AUDIO, ids=[c + ":" + w for _, c, w in BAD_AUDIO])
def test_bad_audio_gets_400_naming_the_part_and_the_server_stays_up(speech_server, part, code, words):
    status, body = speech_server.post(user_parts(text("?"), part))
    assert status == 400, body
    err = body["error"]
    assert err["code"] == code and words in err["message"], err
    assert err["param"] == "messages[0].content[1]" and err["type"] == "invalid_request_error"
    assert speech_server.healthy()


BAD_REQUESTS = [
    ({"messages": [{"role": "user", "content": [input_audio(wav())] * 2}]}, "too_many_audios", "max_audios"),
    ({"modalities": ["audio"]}, "invalid_value", "'modalities' must be"),
    ({"modalities": ["text", "audio"]}, "invalid_value", "need 'audio'"),
    (
        {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
        "invalid_value",
        "'heart'",
    ),
    (
        {"modalities": ["text", "audio"], "audio": {"voice": "heart", "format": "mp3"}},
        "invalid_value",
        "'wav'",
    ),
    (
        {"modalities": ["text", "audio"], "audio": {"voice": "heart", "format": "wav"}, "stream": True},
        None,
        "not streamed",
    ),
    ({"audio": {"voice": "heart", "format": "wav"}}, "invalid_value", "only used with modalities"),
]


@pytest.mark.parametrize(("extra", "code", "words"), BAD_REQUESTS, ids=[w for _, _, w in BAD_REQUESTS])
def test_bad_speech_requests_get_400_and_the_server_stays_up(speech_server, extra, code, words):
    status, body = speech_server.post({**user_parts(input_audio(wav())), **extra})
    assert status == 400, body
    assert body["error"]["code"] == code and words in body["error"]["message"], body
    assert speech_server.healthy()


def test_openai_client_raises_for_bad_audio_and_a_model_without_speech_refuses_it(speech_server, tmp_path):
    with pytest.raises(openai.BadRequestError, match="invalid_audio|truncated"):
        speech_server.client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": [input_audio(wav()[:100])]}]
        )
    from test_server import save_tiny_model

    plain = MultimodalModel.from_pretrained(save_tiny_model(tmp_path / "plain")).eval()
    running = RunningServer(create_app(plain, model_id=MODEL_ID, limits=LIMITS))
    try:
        status, body = running.post(user_parts(input_audio(wav()), text("?")))
        assert status == 400 and "takes no audio" in body["error"]["message"], body
        assert running.healthy()
    finally:
        running.stop()
