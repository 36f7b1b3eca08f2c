"""Audio in: decode, mix to mono, resample to 16 kHz, 80-dimensional log-mel features (Llama 3 §8.1.1).

Shapes: b batch, f feature frames (10 ms each), m mel bins.

The speech encoder of Llama 3 reads 80-dimensional mel-spectrogram features of 16 kHz audio. This
module turns any common audio file into those features:

* **Decoding** picks the decoder by looking at the bytes, not the file name: WAV, FLAC, AIFF, AU and
  CAF go to libsndfile (``soundfile``); MP3, Ogg (Vorbis / Opus), WebM / Matroska, MP4 / M4A and
  ADTS AAC go to FFmpeg (PyAV). Anything unrecognised is offered to both.
* **Mono**: channels are averaged. **Resampling** to 16 kHz uses ``torchaudio.functional.resample``
  (windowed-sinc, torchaudio's defaults).
* **Features**: ``torchaudio.transforms.MelSpectrogram`` with a 25 ms Hann window (400 samples), a
  10 ms hop (160 samples), ``n_fft`` 400, 80 HTK-scale mel bins, power 2, centred frames; then the
  natural log with a floor of ``1e-10`` (so digital silence gives ``log(1e-10) ≈ -23``, not ``-inf``);
  then, by default, per-utterance mean and variance normalisation of each mel bin (BEST-RQ relies
  on normalised inputs: its masked frames are replaced by N(0, 0.1) noise in this space).
* **Errors** are :class:`AudioError` (a ``ValueError``) and say what was wrong: empty input, no
  audio stream, unsupported or unrecognised format, corrupt or truncated data, too long (naming the
  cap) or too large. A cut-off file is caught when its header states the length (WAV, FLAC,
  MP3 with a Xing / Info header, WebM / Matroska with a duration, MP4) or when the decoder fails;
  a stream with no stated length (live WebM, bare MP3 or AAC) decodes to the audio that is there.

Lossy codecs may add or drop a few milliseconds of encoder delay / padding; the loaded length is
what the decoder returns, so always derive token counts from the loaded waveform.
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import torch
import torchaudio

from mm.datasets._media_file import read_media_file

__all__ = ["AudioConfig", "AudioError", "load_audio", "log_mel", "num_frames", "pad_features"]

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# Formats libsndfile reads natively; everything else goes to FFmpeg first.
_SOUNDFILE_KINDS = frozenset({"wav", "flac", "aiff", "au", "caf"})
# Containers whose header states the duration exactly; a decode that falls short is a truncated file.
_DECLARED_DURATION_FORMATS = ("matroska", "webm", "mov", "mp4")


class AudioError(ValueError):
    """Audio that cannot be used: empty, corrupt, truncated, unsupported, too long or too large."""


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """How audio is loaded and turned into features (defaults: Llama 3 §8.1.1).

    Args:
        sample_rate: rate everything is resampled to, in Hz.
        n_mels: mel bins per frame.
        win_ms: analysis window length in milliseconds (25 ms = 400 samples at 16 kHz).
        hop_ms: frame hop in milliseconds (10 ms = 160 samples at 16 kHz).
        n_fft: FFT size; at least the window length.
        log_floor: power values are clamped to at least this before the natural log.
        normalize: subtract each mel bin's mean and divide by its standard deviation over the
            utterance's frames.
        max_seconds: longest audio accepted (the paper crops pre-training audio to 60 s);
            ``None`` for no cap.
        too_long: ``"error"`` raises :class:`AudioError` for audio over ``max_seconds``;
            ``"truncate"`` keeps its first ``max_seconds``.
        max_bytes: largest encoded input accepted, checked before decoding; ``None`` for no cap.
    """

    sample_rate: int = 16000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 400
    log_floor: float = 1e-10
    normalize: bool = True
    max_seconds: float | None = 60.0
    too_long: Literal["error", "truncate"] = "error"
    max_bytes: int | None = 256 * 2**20

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.n_mels <= 0 or self.win_ms <= 0 or self.hop_ms <= 0:
            raise ValueError("AudioConfig: sample_rate, n_mels, win_ms and hop_ms must be positive")
        if self.n_fft < self.win_length:
            raise ValueError(
                f"AudioConfig: n_fft ({self.n_fft}) is shorter than the window ({self.win_length})"
            )
        if self.too_long not in ("error", "truncate"):
            raise ValueError(f"AudioConfig: too_long must be 'error' or 'truncate', not {self.too_long!r}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("AudioConfig: max_seconds must be positive or None")

    @property
    def win_length(self) -> int:
        """Window length in samples."""
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        """Hop length in samples."""
        return round(self.sample_rate * self.hop_ms / 1000)


# ---------------------------------------------------------------------------------------- loading
def load_audio(source: AudioSource, *, config: AudioConfig = AudioConfig()) -> torch.Tensor:
    """Decode audio to a mono float32 waveform ``[samples]`` at ``config.sample_rate``.

    Args:
        source: a path, the encoded bytes, or a binary file-like object.
        config: sample rate and caps.

    Raises:
        AudioError: empty, corrupt, truncated, unsupported, too long or too large input.
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    data, name = _read_source(source, config.max_bytes)
    if not data:
        raise AudioError(f"{name}: empty input (0 bytes)")
    kind = _sniff(data)
    if kind == "wav":
        _check_riff_complete(data, name)
    if kind in _SOUNDFILE_KINDS:
        decoders = (_decode_soundfile, _decode_pyav)
    elif kind is not None:
        decoders = (_decode_pyav,)
    else:
        decoders = (_decode_soundfile, _decode_pyav)
    failures: list[str] = []
    for decode in decoders:
        try:
            samples, rate = decode(data, name, config)
            break
        except _DecodeFailure as e:
            failures.append(str(e))
    else:
        if kind is None:
            raise AudioError(f"{name}: unsupported or unrecognised audio format ({'; '.join(failures)})")
        raise AudioError(f"{name}: corrupt or truncated {kind} data ({'; '.join(failures)})")

    if samples.shape[0] == 0:
        raise AudioError(f"{name}: contains no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: corrupt data (samples are NaN or infinite)")
    wave = torch.from_numpy(samples).mean(dim=1)  # [samples], channels averaged
    if rate != config.sample_rate:
        wave = torchaudio.functional.resample(wave, rate, config.sample_rate)
    return wave.to(torch.float32).contiguous()


class _DecodeFailure(Exception):
    """One decoder could not read the data; the next one may."""


def _read_source(source: AudioSource, max_bytes: int | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        data = read_media_file(name, kind="audio", error=AudioError, max_bytes=max_bytes)
    elif hasattr(source, "read"):
        name = str(getattr(source, "name", "<file object>"))
        data = source.read(-1 if max_bytes is None else max_bytes + 1)
        if not isinstance(data, bytes):
            raise TypeError(f"{name}: file object must be opened in binary mode")
    else:
        raise TypeError(
            f"load_audio: expected a path, bytes or a binary file object, got {type(source).__name__}"
        )
    if max_bytes is not None and len(data) > max_bytes:
        raise AudioError(f"{name}: input is over the cap of max_bytes={max_bytes}")
    return data, name


def _sniff(data: bytes) -> str | None:
    """Name the format from its magic bytes, or ``None`` when not recognised."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b".snd":
        return "au"
    if head[:4] == b"caff":
        return "caf"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "webm"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync; layer bits 00 mean an ADTS AAC stream instead.
        return "aac" if (head[1] >> 1) & 0b11 == 0 else "mp3"
    return None


def _check_riff_complete(data: bytes, name: str) -> None:
    """Raise when a WAV file's ``data`` chunk is shorter than its header says (a cut-off file).

    Both libsndfile and FFmpeg silently return the samples that are there, so this is checked here.
    Sizes 0 and 0xFFFFFFFF mean "unknown" (streamed WAV, RF64) and are not checked.
    """
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        if chunk_id == b"data":
            if size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data):
                raise AudioError(
                    f"{name}: truncated wav data (header declares {size} bytes of samples, "
                    f"{len(data) - pos - 8} present)"
                )
            return
        pos += 8 + size + (size & 1)  # chunks are padded to an even size


def _cap_samples(rate: int, config: AudioConfig) -> int | None:
    return None if config.max_seconds is None else math.floor(config.max_seconds * rate)


def _too_long(name: str, seconds: float, config: AudioConfig) -> AudioError:
    return AudioError(
        f"{name}: audio is {seconds:.2f} s long, over the cap of max_seconds={config.max_seconds} "
        "(raise the cap, or set too_long='truncate')"
    )


def _decode_soundfile(data: bytes, name: str, config: AudioConfig) -> tuple[np.ndarray, int]:
    """libsndfile: returns ``[samples, channels]`` float32 and the native rate."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sf:
            rate, declared = sf.samplerate, sf.frames
            cap = _cap_samples(rate, config)
            to_read = declared
            if cap is not None and declared > cap:
                if config.too_long == "error":
                    raise _too_long(name, declared / rate, config)
                to_read = cap
            samples = sf.read(to_read, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise _DecodeFailure(f"libsndfile: {e.error_string}") from e
    except (RuntimeError, TypeError) as e:
        raise _DecodeFailure(f"libsndfile: {e}") from e
    if samples.shape[0] < to_read:
        raise AudioError(
            f"{name}: truncated data (header declares {to_read} samples, {samples.shape[0]} decoded)"
        )
    return samples, rate


def _decode_pyav(data: bytes, name: str, config: AudioConfig) -> tuple[np.ndarray, int]:
    """FFmpeg through PyAV: returns ``[samples, channels]`` float32 and the native rate."""
    import av

    chunks: list[np.ndarray] = []
    rate = 0
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioError(f"{name}: no audio stream found ({container.format.name} data)")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")  # keep the layout and rate, float planar
            cap = None
            for frame in container.decode(stream):
                if not rate:
                    rate = frame.sample_rate
                    cap = _cap_samples(rate, config)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # [channels, samples]
                    total += out.samples
                if cap is not None and total > cap:
                    if config.too_long == "error":
                        declared = _declared_seconds(container, stream)
                        raise _too_long(name, max(total / rate, declared or 0.0), config)
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
                    total += out.samples
                declared = _declared_seconds(container, stream)
                # Decoded audio well short of the duration a header states: the file was cut off.
                if (
                    declared is not None
                    and rate
                    and _declares_exact_duration(container, data)
                    and total / rate + 0.1 + 0.02 * declared < declared
                ):
                    raise AudioError(
                        f"{name}: truncated {container.format.name} data (header declares "
                        f"{declared:.2f} s, {total / rate:.2f} s decoded)"
                    )
    except av.FFmpegError as e:
        raise _DecodeFailure(f"FFmpeg: {e}") from e
    if not chunks:
        return np.zeros((0, 1), dtype=np.float32), rate or config.sample_rate
    samples = np.concatenate(chunks, axis=1).T  # [samples, channels]
    cap = _cap_samples(rate, config)
    if cap is not None:
        samples = samples[:cap]
    return np.ascontiguousarray(samples, dtype=np.float32), rate


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _declares_exact_duration(container, data: bytes) -> bool:
    """Whether the duration came from a header rather than FFmpeg's bitrate estimate.

    Matroska / WebM and MP4 store it; MP3 does when a Xing / Info / VBRI frame opens the stream
    (LAME and FFmpeg write one). Bare MP3 and ADTS AAC only have an estimate, which may be wrong
    for valid variable-bitrate files, so they are not checked.
    """
    fmt = container.format.name
    if any(tag in fmt for tag in _DECLARED_DURATION_FORMATS):
        return True
    if fmt == "mp3":
        start = 0
        if data[:3] == b"ID3" and len(data) >= 10:
            # ID3v2 size: four 7-bit "syncsafe" bytes, plus the 10-byte header.
            start = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
        first_frame = data[start : start + 200]
        return any(tag in first_frame for tag in (b"Xing", b"Info", b"VBRI"))
    return False


# --------------------------------------------------------------------------------------- features
def num_frames(num_samples: int, config: AudioConfig = AudioConfig()) -> int:
    """Feature frames :func:`log_mel` gives for ``num_samples`` samples (centred frames)."""
    if num_samples <= config.n_fft // 2:
        raise AudioError(
            f"audio of {num_samples} samples is too short for features: need more than "
            f"{config.n_fft // 2} samples ({1000 * (config.n_fft // 2 + 1) / config.sample_rate:.1f} ms)"
        )
    return 1 + num_samples // config.hop_length


@functools.lru_cache(maxsize=8)
def _mel_transform(config: AudioConfig, device: str) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate,
        n_fft=config.n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
        power=2.0,
        center=True,
        pad_mode="reflect",
        mel_scale="htk",
        norm=None,
    ).to(device)


def log_mel(waveform: torch.Tensor, config: AudioConfig = AudioConfig()) -> torch.Tensor:
    """Log-mel features of a 16 kHz waveform (Llama 3 §8.1.1: 80 bins, 25 ms window, 10 ms hop).

    Args:
        waveform: ``[samples]`` or ``[b, samples]`` (rows of equal length) at ``config.sample_rate``.
        config: feature settings.

    Returns:
        ``[f, m]`` or ``[b, f, m]`` float32, ``f = num_frames(samples)``.
    """
    if waveform.ndim not in (1, 2):
        raise ValueError(
            f"log_mel: waveform must be [samples] or [b, samples], got shape {tuple(waveform.shape)}"
        )
    num_frames(waveform.shape[-1], config)  # raises for too-short input
    transform = _mel_transform(config, str(waveform.device))
    power = transform(waveform.float())  # [..., m, f]
    feats = power.clamp(min=config.log_floor).log().transpose(-1, -2)  # [..., f, m]
    if config.normalize:
        mean = feats.mean(dim=-2, keepdim=True)
        std = feats.std(dim=-2, keepdim=True, unbiased=False)
        feats = (feats - mean) / (std + 1e-5)
    return feats.contiguous()


def pad_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-utterance features ``[f_i, m]`` into ``([b, max f_i, m], lengths [b])``, zero-padded."""
    if not features:
        raise ValueError("pad_features: no features given")
    dims = {f.shape[-1] for f in features}
    if any(f.ndim != 2 for f in features) or len(dims) != 1:
        raise ValueError(
            f"pad_features: every item must be [frames, mels] with the same mels, got {[tuple(f.shape) for f in features]}"
        )
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    out = features[0].new_zeros(len(features), int(lengths.max()), dims.pop())  # [b, f, m]
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
    return out, lengths
