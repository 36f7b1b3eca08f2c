"""Speech path (Llama 3 §8): audio decoding and log-mel, Conformer, BEST-RQ, speech adapter."""

from __future__ import annotations

import io
import math

import av
import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from PIL import Image

from mm.adapters.speech_adapter import SpeechAdapter, SpeechAdapterConfig, num_audio_tokens, splice_audio
from mm.datasets.audio import AudioConfig, AudioError, load_audio, log_mel, num_frames, pad_features
from mm.encoders.best_rq import BestRqHead, BestRqQuantizer, best_rq_loss, mask_features, span_mask
from mm.encoders.conformer import ConformerConfig, ConformerEncoder

TINY = dict(width=32, num_layers=2, num_heads=4, ffn_dim=64, conv_kernel=7)


# ------------------------------------------------------------------------------------ generated audio
def _tone(rate: int, seconds: float, freq: float = 1000.0, channels: int = 1) -> np.ndarray:
    """``[samples, channels]`` float32: a sine in channel 0, half its amplitude in channel 1, plus a chirp."""
    t = np.arange(round(rate * seconds)) / rate
    base = 0.5 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    cols = [base, 0.5 * base][:channels]
    return np.stack(cols, axis=1).astype(np.float32)


def _soundfile_bytes(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _pyav_bytes(x: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    layout = "mono" if x.shape[1] == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave * torch.hann_window(wave.shape[0]))
    return float(spectrum.abs().argmax()) * rate / wave.shape[0]


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize(
    ("fmt", "rate", "channels"), [("WAV", 8000, 1), ("WAV", 44100, 2), ("FLAC", 22050, 2), ("FLAC", 48000, 1)]
)
def test_lossless_files_resample_to_16k(tmp_path, fmt, rate, channels):
    x = _tone(rate, 0.75, channels=channels)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, x, rate, format=fmt)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert wave.shape[0] == math.ceil(x.shape[0] * 16000 / rate)
    assert abs(_peak_hz(wave, 16000) - 1000.0) < 3.0  # the tone survives decoding and resampling
    mono = torch.from_numpy(x).mean(dim=1)
    reference = mono if rate == 16000 else torchaudio.functional.resample(mono, rate, 16000)
    torch.testing.assert_close(wave, reference, atol=1e-4, rtol=0)  # 16-bit quantisation


def test_stereo_is_averaged_to_mono_exactly():
    x = np.random.default_rng(0).uniform(-1, 1, size=(4000, 2)).astype(np.float32)
    wave = load_audio(_soundfile_bytes(x, 16000, "WAV", "FLOAT"))  # float WAV: no quantisation
    torch.testing.assert_close(wave, torch.from_numpy((x[:, 0] + x[:, 1]) / 2), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("container", "codec", "rate", "channels"),
    [
        ("mp3", "libmp3lame", 44100, 2),
        ("mp3", "libmp3lame", 22050, 1),
        ("ogg", "libopus", 48000, 2),
        ("webm", "libopus", 48000, 1),
        ("ipod", "aac", 44100, 2),  # .m4a
    ],
)
def test_compressed_formats_decode_through_pyav(tmp_path, container, codec, rate, channels):
    x = _tone(rate, 1.0, channels=channels)
    data = _pyav_bytes(x, rate, container, codec)
    wave = load_audio(data)
    # Lossy codecs add or trim up to a codec frame of delay / padding (AAC: 1024 + 1024 samples).
    assert abs(wave.shape[0] - 16000) <= 0.07 * 16000
    assert abs(_peak_hz(wave, 16000) - 1000.0) < 3.0
    # The same data as a file-like object, and as a file whose name lies about its format.
    assert torch.equal(load_audio(io.BytesIO(data)), wave)
    misnamed = tmp_path / "clip.wav"
    misnamed.write_bytes(data)
    assert torch.equal(load_audio(misnamed), wave)


def test_format_is_detected_from_content_not_extension(tmp_path):
    path = tmp_path / "really_a_wav.mp3"
    soundfile.write(path, _tone(16000, 0.5), 16000, format="WAV")
    assert load_audio(path).shape == (8000,)


# ----------------------------------------------------------------------------------------- features
def test_log_mel_matches_torchaudio_mel_spectrogram():
    wave = torch.randn(16000) * 0.1
    feats = log_mel(wave, AudioConfig(normalize=False))
    assert feats.shape == (1 + 16000 // 160, 80) == (num_frames(16000), 80)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80
    )
    torch.testing.assert_close(feats, torch.log(mel(wave).clamp(min=1e-10)).T)
    # A batch of equal-length rows is the same as row by row.
    batch = torch.stack([wave, wave.flip(0)])
    torch.testing.assert_close(log_mel(batch)[1], log_mel(wave.flip(0)))


def test_log_mel_normalisation_and_silence():
    feats = log_mel(torch.randn(8000))
    torch.testing.assert_close(feats.mean(dim=0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.std(dim=0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)
    silent = log_mel(torch.zeros(8000), AudioConfig(normalize=False))
    assert torch.isfinite(silent).all() and torch.allclose(silent, torch.tensor(math.log(1e-10)))


def test_tone_lands_in_its_htk_mel_bin():
    def hz_to_mel(hz):
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    # Centre of filter 30 of 80 triangles spread evenly in HTK mel between 0 Hz and 8 kHz.
    centre_mel = hz_to_mel(8000.0) * (30 + 1) / (80 + 1)
    freq = 700.0 * (10 ** (centre_mel / 2595.0) - 1.0)
    t = torch.arange(16000) / 16000
    feats = log_mel(torch.sin(2 * math.pi * freq * t), AudioConfig(normalize=False))
    assert int(feats.mean(dim=0).argmax()) == 30


def test_pipeline_shapes_and_pad_features(tmp_path):
    clips = []
    for i, rate in enumerate((8000, 22050, 48000)):
        path = tmp_path / f"{i}.flac"
        soundfile.write(path, _tone(rate, 0.3 + 0.2 * i, channels=2), rate, format="FLAC")
        wave = load_audio(path)
        feats = log_mel(wave)
        assert feats.shape == (num_frames(wave.shape[0]), 80)
        clips.append(feats)
    batch, lengths = pad_features(clips)
    assert lengths.tolist() == [c.shape[0] for c in clips]
    assert batch.shape == (3, max(lengths.tolist()), 80)
    for row, clip in zip(batch, clips):
        assert torch.equal(row[: clip.shape[0]], clip) and not row[clip.shape[0] :].any()


# ------------------------------------------------------------------------------------------ errors
def test_bad_audio_gives_clear_errors(tmp_path):
    wav = _soundfile_bytes(_tone(16000, 1.0), 16000, "WAV")
    flac = _soundfile_bytes(_tone(16000, 1.0), 16000, "FLAC")
    mp3 = _pyav_bytes(_tone(44100, 1.0), 44100, "mp3", "libmp3lame")
    webm = _pyav_bytes(_tone(48000, 1.0), 48000, "webm", "libopus")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty file \(0 bytes\)"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="unsupported or unrecognised"):
        load_audio(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError, match="unsupported or unrecognised"):
        load_audio(b"just some text, not audio at all\n" * 20)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(png.getvalue())
    with pytest.raises(AudioError, match="truncated wav"):
        load_audio(wav[: len(wav) // 2])
    with pytest.raises(AudioError, match="corrupt or truncated flac"):
        load_audio(flac[: len(flac) // 2])
    with pytest.raises(AudioError, match="truncated mp3"):
        load_audio(mp3[: len(mp3) // 2])
    with pytest.raises(AudioError, match="truncated matroska"):
        load_audio(webm[: len(webm) // 2])
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(_soundfile_bytes(np.zeros((0, 1), np.float32), 16000, "WAV"))
    with pytest.raises(AudioError, match=r"max_seconds=0\.5"):
        load_audio(wav, config=AudioConfig(max_seconds=0.5))
    with pytest.raises(AudioError, match=r"max_seconds=0\.5"):
        load_audio(mp3, config=AudioConfig(max_seconds=0.5))
    with pytest.raises(AudioError, match="max_bytes=1000"):
        load_audio(wav, config=AudioConfig(max_bytes=1000))
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="too short"):
        log_mel(torch.zeros(100))


def test_too_long_can_truncate_instead():
    config = AudioConfig(max_seconds=0.5, too_long="truncate")
    assert load_audio(_soundfile_bytes(_tone(16000, 1.0), 16000, "WAV"), config=config).shape == (8000,)
    mp3 = _pyav_bytes(_tone(44100, 1.0), 44100, "mp3", "libmp3lame")
    assert load_audio(mp3, config=config).shape == (8000,)


# --------------------------------------------------------------------------------------- conformer
def _padded_batch(lengths, dim=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), dim, generator=gen)
    for i, n in enumerate(lengths):
        feats[i, n:] = 100.0 * torch.randn(max(lengths) - n, dim, generator=gen)  # loud junk as padding
    return feats, torch.tensor(lengths)


@pytest.mark.parametrize("conv_norm", ["layer", "group"])
def test_conformer_batched_equals_one_at_a_time(conv_norm):
    encoder = ConformerEncoder(ConformerConfig(**TINY, conv_norm=conv_norm)).eval()
    feats, lengths = _padded_batch([37, 20, 9])
    hidden, out_lengths = encoder(feats, lengths)
    assert hidden.shape == (3, 37 // 4, 32) and out_lengths.tolist() == [9, 5, 2]
    for i, n in enumerate(lengths.tolist()):
        single, single_len = encoder(feats[i : i + 1, :n], lengths[i : i + 1])
        assert single.shape[1] == single_len.item() == n // 4
        torch.testing.assert_close(hidden[i, : n // 4], single[0], atol=1e-5, rtol=1e-5)
        assert not hidden[i, n // 4 :].any()


def test_conformer_rejects_bad_input():
    encoder = ConformerEncoder(ConformerConfig(**TINY))
    with pytest.raises(ValueError, match="at least 4 frames"):
        encoder(torch.randn(2, 8, 80), torch.tensor([8, 3]))
    with pytest.raises(ValueError, match=r"\[b, f, 80\]"):
        encoder(torch.randn(1, 8, 40), torch.tensor([8]))
    with pytest.raises(ValueError, match="exceeds"):
        encoder(torch.randn(1, 8, 80), torch.tensor([9]))


def _torchaudio_state_dict(encoder: ConformerEncoder) -> dict[str, torch.Tensor]:
    """Our layer weights under torchaudio ``Conformer`` names (pointwise Linear -> Conv1d k=1)."""
    out = {}
    for i, layer in enumerate(encoder.layers):
        ta = f"conformer_layers.{i}."
        for ffn in ("ffn1", "ffn2"):
            for ours, theirs in (("norm", "sequential.0"), ("fc1", "sequential.1"), ("fc2", "sequential.4")):
                for p in ("weight", "bias"):
                    out[f"{ta}{ffn}.{theirs}.{p}"] = getattr(getattr(layer, ffn), ours).state_dict()[p]
        attn = layer.attn
        out[f"{ta}self_attn.in_proj_weight"] = torch.cat(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        )
        out[f"{ta}self_attn.in_proj_bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        out[f"{ta}self_attn.out_proj.weight"] = attn.o_proj.weight
        out[f"{ta}self_attn.out_proj.bias"] = attn.o_proj.bias
        pairs = {
            "self_attn_layer_norm": layer.attn_norm,
            "conv_module.layer_norm": layer.conv.norm,
            "conv_module.sequential.2": layer.conv.depthwise,
            "conv_module.sequential.3": layer.conv.depthwise_norm,
            "final_layer_norm": layer.final_norm,
        }
        for theirs, module in pairs.items():
            out[f"{ta}{theirs}.weight"] = module.weight
            out[f"{ta}{theirs}.bias"] = module.bias
        for theirs, module in (
            ("sequential.0", layer.conv.pointwise_in),
            ("sequential.5", layer.conv.pointwise_out),
        ):
            out[f"{ta}conv_module.{theirs}.weight"] = module.weight[..., None]
            out[f"{ta}conv_module.{theirs}.bias"] = module.bias
    return {k: v.detach().clone() for k, v in out.items()}


def test_conformer_layers_match_torchaudio():
    """With rotary off and GroupNorm, our layers are torchaudio's ``Conformer`` (run per utterance:
    torchaudio's convolution and GroupNorm see padding, ours do not)."""
    config = ConformerConfig(**TINY, rotary=False, conv_norm="group")
    encoder = ConformerEncoder(config).eval()
    with torch.no_grad():
        for p in encoder.parameters():  # norms start at 1 / 0: make every weight matter
            p.add_(torch.randn_like(p) * 0.1)
    reference = torchaudio.models.Conformer(
        input_dim=32, num_heads=4, ffn_dim=64, num_layers=2, depthwise_conv_kernel_size=7, use_group_norm=True
    ).eval()
    reference.load_state_dict(_torchaudio_state_dict(encoder), strict=True)
    feats, lengths = _padded_batch([41, 28, 16])
    hidden, out_lengths = encoder(feats, lengths)
    with torch.no_grad():
        x, _ = encoder.embed(feats, lengths)
        for i, n in enumerate(out_lengths.tolist()):
            expected, _ = reference(x[i : i + 1, :n], torch.tensor([n]))
            torch.testing.assert_close(hidden[i, :n], expected[0], atol=1e-5, rtol=1e-5)
    # Rotary attention is a different function of the same weights.
    rotary = ConformerEncoder(ConformerConfig(**TINY, rotary=True, conv_norm="group")).eval()
    rotary.load_state_dict(encoder.state_dict())
    assert not torch.allclose(rotary(feats, lengths)[0], hidden, atol=1e-3)


def test_conformer_paper_size_is_about_1b_parameters():
    with torch.device("meta"):
        encoder = ConformerEncoder(ConformerConfig())
    count = sum(p.numel() for p in encoder.parameters())
    assert 0.95e9 < count < 1.05e9  # "a Conformer model with 1B parameters" (§8.1.2)


# ---------------------------------------------------------------------------------------- BEST-RQ
def test_best_rq_targets_are_deterministic_and_seeded():
    feats, lengths = _padded_batch([48, 30])
    torch.manual_seed(1)
    first = BestRqQuantizer(seed=7)
    torch.manual_seed(2)  # the global RNG must not matter
    second = BestRqQuantizer(seed=7)
    other = BestRqQuantizer(seed=8)
    targets = first.targets(feats, lengths)
    assert targets.shape == (2, 12, 16) and targets.dtype == torch.long
    assert torch.equal(targets, second.targets(feats, lengths))
    assert (targets[1, 30 // 4 :] == -100).all() and (targets[:, :7] >= 0).all() and (targets < 8192).all()
    assert (other.targets(feats, lengths)[:, :7] == targets[:, :7]).float().mean() < 0.1
    # Nearest by cosine: scaling the features does not change the targets; the buffers stay out of
    # checkpoints (the seed regenerates them).
    assert torch.equal(first.targets(3.0 * feats, lengths), targets)
    assert dict(first.state_dict()) == {} and not list(first.parameters())
    norms = first.codebooks.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_span_mask_respects_lengths_spans_and_probability():
    lengths = torch.tensor([2000] * 8 + [40, 5])
    mask = span_mask(lengths, prob=0.025, span=32, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (10, 2000)
    for row, n in zip(mask, lengths.tolist()):
        assert not row[n:].any() and row[:n].any()
        # Every maximal masked run is a whole span (or longer, when spans overlap) unless cut at the end.
        padded = torch.cat([torch.tensor([False]), row[:n], torch.tensor([False])]).int()
        edges = padded.diff()
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        for s, e in zip(starts.tolist(), ends.tolist()):
            assert e - s >= 32 or e == n
    # Each frame is masked unless none of the previous 32 frames started a span: 1 - 0.975^32 ≈ 0.555.
    fraction = mask[:8].float().mean().item()
    assert 0.50 < fraction < 0.61
    # With probability 0 every utterance still gets exactly one span.
    one = span_mask(torch.tensor([300, 100]), prob=0.0, span=32, generator=torch.Generator().manual_seed(0))
    assert one.sum(dim=1).tolist() == [32, 32]
    same = span_mask(lengths, prob=0.025, span=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, same)


def test_mask_features_replaces_whole_groups_with_noise():
    feats, lengths = _padded_batch([400, 250])
    masked, enc_mask = mask_features(
        feats,
        lengths,
        stack=4,
        prob=0.025,
        span=32,
        noise_std=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    assert enc_mask.shape == (2, 100) and not enc_mask[1, 250 // 4 :].any()
    input_mask = enc_mask.repeat_interleave(4, dim=1)  # [b, f]
    assert torch.equal(masked[~input_mask], feats[~input_mask])
    noise = masked[input_mask]
    assert abs(noise.std().item() - 0.1) < 0.01 and abs(noise.mean().item()) < 0.01


@pytest.mark.parametrize(("same_mask", "factor"), [(True, 0.3), (False, 0.75)])
def test_best_rq_loss_falls(same_mask, factor):
    """A fixed batch: with the same mask every step the masked targets are memorised; with a new
    mask every step the encoder must still learn to predict them from the visible context."""
    torch.manual_seed(0)
    encoder = ConformerEncoder(ConformerConfig(**TINY))
    quantizer = BestRqQuantizer(codebook_size=32, num_codebooks=2, seed=0)
    head = BestRqHead(32, codebook_size=32, num_codebooks=2)
    feats, lengths = _padded_batch([96, 80, 64, 72], seed=1)
    for i, n in enumerate(lengths.tolist()):
        feats[i, n:] = 0
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        if same_mask:
            generator.manual_seed(0)
        loss = best_rq_loss(encoder, quantizer, head, feats, lengths, generator=generator, prob=0.05, span=8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(32)) < 0.5  # starts near chance
    assert sum(losses[-5:]) / 5 < factor * losses[0], losses


# ---------------------------------------------------------------------------------------- adapter
TINY_ADAPTER = dict(input_dim=32, width=48, num_heads=4, ffn_dim=64, output_dim=24)


def test_adapter_output_length_matches_formula():
    adapter = SpeechAdapter(SpeechAdapterConfig(**TINY_ADAPTER)).eval()
    for frames in range(1, 12):
        embeds, out_lengths = adapter(torch.randn(1, frames, 32))
        assert embeds.shape == (1, math.ceil(frames / 2), 24)  # kernel 3, stride 2, padding 1
        assert out_lengths.item() == adapter.config.output_length(frames) == math.ceil(frames / 2)


def test_num_audio_tokens_matches_the_whole_pipeline():
    enc_cfg = ConformerConfig(**TINY)
    ada_cfg = SpeechAdapterConfig(**TINY_ADAPTER)
    encoder, adapter = ConformerEncoder(enc_cfg).eval(), SpeechAdapter(ada_cfg).eval()
    for samples in (480, 1000, 8000, 12345, 16000):
        feats = log_mel(torch.randn(samples))
        hidden, lengths = encoder(feats[None])
        embeds, _ = adapter(hidden, lengths)
        assert embeds.shape[1] == num_audio_tokens(samples, AudioConfig(), enc_cfg, ada_cfg)
    # 10 ms frames, 40 ms encoder frames, 80 ms adapter frames: one minute is 750 tokens.
    assert num_audio_tokens(60 * 16000) == 750
    with pytest.raises(ValueError, match="fewer than"):
        num_audio_tokens(300)


def test_adapter_batched_equals_one_at_a_time():
    adapter = SpeechAdapter(SpeechAdapterConfig(**TINY_ADAPTER)).eval()
    hidden = torch.randn(3, 11, 32)
    lengths = torch.tensor([11, 6, 1])
    hidden[1, 6:] = 50.0
    hidden[2, 1:] = -50.0
    embeds, out_lengths = adapter(hidden, lengths)
    assert out_lengths.tolist() == [6, 3, 1]
    for i, n in enumerate(lengths.tolist()):
        single, _ = adapter(hidden[i : i + 1, :n])
        m = out_lengths[i].item()
        torch.testing.assert_close(embeds[i, :m], single[0], atol=1e-5, rtol=1e-5)
        assert not embeds[i, m:].any()


def test_splice_audio_places_clips_and_checks_them():
    audio_id = 9
    ids = torch.tensor([[1, 9, 9, 9, 2, 9, 9, 3], [1, 4, 9, 9, 9, 9, 5, 6]])
    embeds = torch.randn(2, 8, 5)
    clips = [torch.randn(3, 5, requires_grad=True), torch.randn(2, 5), torch.randn(4, 5)]
    out = splice_audio(embeds, ids, audio_id, clips)
    assert torch.equal(out[0, 1:4], clips[0].detach()) and torch.equal(out[0, 5:7], clips[1])
    assert torch.equal(out[1, 2:6], clips[2])
    keep = ids != audio_id
    assert torch.equal(out[keep], embeds[keep])
    out.sum().backward()
    assert torch.equal(clips[0].grad, torch.ones(3, 5))
    with pytest.raises(ValueError, match="found 3 runs"):
        splice_audio(embeds, ids, audio_id, clips[:2])
    with pytest.raises(ValueError, match=r"needs \[2, 5\]"):
        splice_audio(embeds, ids, audio_id, [clips[0], torch.randn(3, 5), clips[2]])
    with pytest.raises(ValueError, match=r"needs \[3, 5\]"):
        splice_audio(embeds, ids, audio_id, [torch.randn(3, 4), clips[1], clips[2]])
    assert torch.equal(splice_audio(embeds, torch.zeros_like(ids), audio_id, []), embeds)


def test_adapter_paper_size_is_about_100m_parameters():
    with torch.device("meta"):
        adapter = SpeechAdapter(SpeechAdapterConfig())
    count = sum(p.numel() for p in adapter.parameters())
    assert 0.9e8 < count < 1.1e8  # "The speech adapter contains about 100M parameters" (§8.1.2)
