"""Offline speech synthesis with hibari-tts's bundled voice (``mm ask --speak``, the server, the demo)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from mm.datasets.audio import load_audio
from mm.serving.speech_out import (
    BUNDLED_VOICE,
    TTS_SAMPLE_RATE,
    SpeechSynthesizer,
    VoiceError,
    bundled_voices,
    check_voice,
    get_synthesizer,
    speak,
    wav_bytes,
)

TEXT = "The red circle is in the top left."


@pytest.fixture(scope="module")
def synth() -> SpeechSynthesizer:
    return get_synthesizer()


def test_only_the_bundled_voice_is_used():
    assert BUNDLED_VOICE in bundled_voices()
    assert check_voice(BUNDLED_VOICE) == BUNDLED_VOICE
    from hibari.voices import VOICES

    downloadable = [name for name, v in VOICES.items() if not v.get("bundled")]
    assert downloadable, "hibari lists voices it would download; mm must refuse them"
    for voice in [*downloadable, "no-such-voice"]:
        with pytest.raises(VoiceError, match=f"{voice!r} is not available offline.*'{BUNDLED_VOICE}'"):
            SpeechSynthesizer(voice)
    with pytest.raises(VoiceError, match="not available offline"):
        speak("hello", "unused.wav", voice=downloadable[0])
    assert issubclass(VoiceError, ValueError)


def test_waveform_rate_determinism_and_speed(synth):
    at_24k = synth(TEXT, seed=3)
    at_16k = synth(TEXT, seed=3, sample_rate=16000)
    assert at_24k.dtype == torch.float32 and at_24k.ndim == 1
    seconds = at_24k.numel() / TTS_SAMPLE_RATE
    assert 1.0 < seconds < 5.0, seconds  # a short sentence
    assert abs(at_16k.numel() - at_24k.numel() * 2 / 3) <= 1
    assert float(at_24k.abs().max()) <= 1.0 and float(at_24k.pow(2).mean().sqrt()) > 0.01  # not silence
    assert torch.equal(synth(TEXT, seed=3), at_24k)  # equal arguments, equal samples
    assert not torch.equal(synth(TEXT, seed=4), at_24k)  # the seed moves the noise
    assert synth(TEXT, seed=3, speed=1.5).numel() < 0.8 * at_24k.numel()  # faster is shorter
    assert synth("", seed=0).numel() == 0
    with pytest.raises(ValueError, match="speed"):
        synth(TEXT, speed=3.0)
    with pytest.raises(TypeError, match="text must be a str"):
        synth(b"bytes")


def test_wav_bytes_are_readable_by_soundfile_and_mm(synth):
    audio = synth(TEXT, seed=1)
    data = synth.wav(TEXT, seed=1)
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == TTS_SAMPLE_RATE and samples.ndim == 1 and samples.shape[0] == audio.numel()
    np.testing.assert_allclose(samples, audio.numpy(), atol=1.0 / 32767 + 1e-6)  # 16-bit quantisation
    info = sf.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)
    # mm's own decoder reads it back at 16 kHz
    assert abs(load_audio(data).numel() - audio.numel() * 2 / 3) <= 1
    # an empty answer still gives a playable file of the minimum length
    silent, rate = sf.read(io.BytesIO(synth.wav("", min_seconds=0.25)))
    assert rate == TTS_SAMPLE_RATE and silent.shape == (6000,) and not silent.any()
    with pytest.raises(ValueError, match=r"audio must be \[samples\]"):
        wav_bytes(np.zeros((2, 10), np.float32), 16000)


def test_speak_writes_a_wav_file(tmp_path):
    path = speak("Blue.", tmp_path / "answer.wav", seed=2)
    assert path == tmp_path / "answer.wav" and not list(tmp_path.glob(".*tmp"))
    samples, rate = sf.read(path)
    assert rate == TTS_SAMPLE_RATE and samples.shape[0] > 0.2 * rate
