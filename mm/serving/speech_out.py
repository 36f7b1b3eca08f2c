"""Speech out, offline: text to speech with the voice bundled in the ``hibari-tts`` wheel.

Used by ``mm ask --speak``, the server's audio output (OpenAI's ``modalities: ["text", "audio"]``)
and ``mm demo``, which synthesises its spoken training and evaluation data here (Llama 3 paper,
section 8: speech understanding is trained on speech paired with text; the demo has no recordings,
so it makes them).

``hibari`` renders 24 kHz mono float32 speech with a small ONNX model on the CPU. Only the voice
that ships inside the wheel (:data:`BUNDLED_VOICE`, "heart") is ever used: hibari downloads its
other voices at run time, which mm never does, so asking for another voice is a
:class:`VoiceError` that names the bundled one. The model file is opened by path with downloading
turned off, so no code path here can reach the network.

Waveforms come back as ``[samples]`` float32 tensors at the rate asked for (16 kHz for the speech
encoder, resampled with torchaudio), or as 16-bit PCM WAV bytes.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import wave
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BUNDLED_VOICE",
    "TTS_SAMPLE_RATE",
    "SpeechSynthesizer",
    "VoiceError",
    "bundled_voices",
    "check_voice",
    "get_synthesizer",
    "speak",
    "wav_bytes",
]

BUNDLED_VOICE = "heart"
"""The voice inside the hibari-tts wheel (American English, female)."""

TTS_SAMPLE_RATE = 24000
"""hibari's output rate in Hz."""


class VoiceError(ValueError):
    """A voice that mm will not use: unknown, or one that hibari would download at run time."""


def bundled_voices() -> tuple[str, ...]:
    """Voices that ship inside the installed hibari-tts wheel (never downloaded)."""
    from hibari.voices import VOICES

    return tuple(name for name, v in VOICES.items() if v.get("bundled"))


def check_voice(voice: str) -> str:
    """Return ``voice`` if it is bundled; otherwise raise :class:`VoiceError` naming the bundled ones."""
    bundled = bundled_voices()
    if voice not in bundled:
        raise VoiceError(
            f"voice {voice!r} is not available offline; the bundled voice{'s are' if len(bundled) > 1 else ' is'} "
            f"{', '.join(repr(v) for v in bundled)}"
        )
    return voice


class SpeechSynthesizer:
    """hibari-tts with the bundled voice; call it to turn text into a waveform.

    Args:
        voice: a bundled voice (see :func:`bundled_voices`).
        threads: onnxruntime threads (one is plenty: hibari runs far faster than real time).

    Raises:
        VoiceError: ``voice`` is not bundled.
    """

    def __init__(self, voice: str = BUNDLED_VOICE, *, threads: int = 1) -> None:
        from hibari import Hibari
        from hibari.voices import voice_path

        self.voice = check_voice(voice)
        # download_missing=False: a bundled voice is a file inside the wheel, never fetched.
        self._tts = Hibari(voice=voice, model=voice_path(voice, download_missing=False), threads=threads)
        self._g2p_lock = threading.Lock()  # the G2P keeps caches; ONNX sessions are thread-safe

    def waveform(
        self, text: str, *, speed: float = 1.0, seed: int = 0, sample_rate: int = TTS_SAMPLE_RATE
    ) -> torch.Tensor:
        """Speech for ``text`` as a ``[samples]`` float32 tensor at ``sample_rate`` Hz.

        Args:
            text: what to say; text with nothing speakable gives an empty tensor.
            speed: 1.0 is the voice's normal pace (hibari accepts 0.5 .. 2.0).
            seed: fixes hibari's noise component, so equal arguments give equal samples.
            sample_rate: output rate; anything but 24000 is resampled (torchaudio, windowed sinc).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not 0.5 <= speed <= 2.0:
            raise ValueError(f"speed must lie in [0.5, 2.0], got {speed}")
        with self._g2p_lock:
            chunks = self._tts.phonemize(text)
        rng = np.random.default_rng(seed)
        parts = [self._tts.from_ids(self._tts.ids(ps), speed, rng) for ps in chunks]
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        wave_ = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if sample_rate != TTS_SAMPLE_RATE and wave_.numel():
            import torchaudio

            wave_ = torchaudio.functional.resample(wave_, TTS_SAMPLE_RATE, sample_rate)
        return wave_.contiguous()

    __call__ = waveform

    def wav(self, text: str, *, speed: float = 1.0, seed: int = 0, min_seconds: float = 0.0) -> bytes:
        """Speech for ``text`` as 16-bit PCM mono WAV bytes at 24 kHz, padded with silence to at
        least ``min_seconds`` (so an empty answer still gives a playable file)."""
        audio = self.waveform(text, speed=speed, seed=seed)
        short = round(min_seconds * TTS_SAMPLE_RATE) - audio.numel()
        if short > 0:
            audio = torch.cat([audio, audio.new_zeros(short)])
        return wav_bytes(audio, TTS_SAMPLE_RATE)


@functools.lru_cache(maxsize=4)
def get_synthesizer(voice: str = BUNDLED_VOICE) -> SpeechSynthesizer:
    """A shared :class:`SpeechSynthesizer` per voice (loading the model and G2P takes about a second)."""
    return SpeechSynthesizer(voice)


def wav_bytes(audio: torch.Tensor | np.ndarray, sample_rate: int) -> bytes:
    """``[samples]`` float audio in ``[-1, 1]`` as 16-bit PCM mono WAV bytes."""
    samples = np.asarray(audio.detach().cpu() if torch.is_tensor(audio) else audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"audio must be [samples], got shape {samples.shape}")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def speak(
    text: str, path: str | os.PathLike, *, voice: str = BUNDLED_VOICE, speed: float = 1.0, seed: int = 0
) -> Path:
    """Say ``text`` into a 24 kHz 16-bit WAV file at ``path`` (``mm ask --speak``); returns the path."""
    path = Path(path)
    data = get_synthesizer(voice).wav(text, speed=speed, seed=seed, min_seconds=0.1)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
