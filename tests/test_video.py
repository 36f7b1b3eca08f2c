"""Video decoding (``mm.datasets.video``) and the temporal aggregator (``mm.adapters.temporal_aggregator``).

Clips are written here with PyAV in every container / codec the loader promises; each frame shows
its own index as a row of black / white bars, so the frames a sampler picked can be read back from
the pixels even through lossy codecs.
"""

from __future__ import annotations

import io
import math

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mm.adapters import temporal_aggregator
from mm.adapters.temporal_aggregator import PerceiverLayer, TemporalAggregator, order_embedding
from mm.datasets.image_processing import CLIP_MEAN, CLIP_STD
from mm.datasets.video import VideoConfig, VideoError, frames_to_tensor, load_video

BITS, BAR, HEIGHT = 6, 16, 32  # frames are BITS * BAR = 96 pixels wide

# (muxer, encoder, file extension): mp4 / webm / mkv / mov with the codecs they usually carry.
FORMATS = [
    ("mp4", "h264", "mp4"),
    ("mp4", "mpeg4", "mp4"),
    ("webm", "libvpx", "webm"),
    ("webm", "libvpx-vp9", "webm"),
    ("matroska", "h264", "mkv"),
    ("mov", "h264", "mov"),
]


def _index_frame(index: int) -> np.ndarray:
    """``[HEIGHT, BITS * BAR, 3]`` uint8: bar ``j`` is white when bit ``j`` of ``index`` is set."""
    frame = np.zeros((HEIGHT, BITS * BAR, 3), dtype=np.uint8)
    for bit in range(BITS):
        if index >> bit & 1:
            frame[:, bit * BAR : (bit + 1) * BAR] = 255
    return frame


def _read_index(image: Image.Image) -> int:
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    bars = [pixels[8:-8, bit * BAR + 4 : (bit + 1) * BAR - 4].mean() > 128 for bit in range(BITS)]
    return sum(1 << bit for bit, on in enumerate(bars) if on)


def _write_clip(target, frames, *, fmt="mp4", codec="h264", fps=10, rotation=None, hflip=False, vflip=False):
    """Encode RGB ``frames`` into ``target`` (a path or a writable file object)."""
    height, width = frames[0].shape[:2] if frames else (HEIGHT, BITS * BAR)
    with av.open(target, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _clip_bytes(num_frames, **kwargs) -> bytes:
    buffer = io.BytesIO()
    _write_clip(buffer, [_index_frame(i) for i in range(num_frames)], **kwargs)
    return buffer.getvalue()


def _audio_only(fmt: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=48000)
        samples = np.zeros((1, 4800), dtype=np.int16 if codec.startswith("pcm") else np.float32)
        frame = av.AudioFrame.from_ndarray(
            samples, format="s16" if codec.startswith("pcm") else "fltp", layout="mono"
        )
        frame.sample_rate = 48000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _expected_indices(num_clip_frames: int, num_frames: int) -> list[int]:
    """The documented rule: the frame on screen at the centre of each of N equal segments."""
    return [math.floor((2 * k + 1) * num_clip_frames / (2 * num_frames)) for k in range(num_frames)]


# ----------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("fmt", "codec", "ext"), FORMATS)
def test_samples_n_frames_uniformly_in_order(tmp_path, fmt, codec, ext):
    path = tmp_path / f"clip.{ext}"
    _write_clip(path, [_index_frame(i) for i in range(20)], fmt=fmt, codec=codec, fps=10)
    clip = load_video(path, config=VideoConfig(num_frames=8))
    indices = [_read_index(frame) for frame in clip.frames]
    assert indices == _expected_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert clip.timestamps == pytest.approx([i / 10 for i in indices])
    assert clip.duration == pytest.approx(2.0)
    assert clip.fps == pytest.approx(10.0)
    assert clip.rotation == 0
    assert all(frame.mode == "RGB" and frame.size == (BITS * BAR, HEIGHT) for frame in clip.frames)


def test_every_frame_once_when_n_equals_frame_count():
    clip = load_video(_clip_bytes(20, fmt="webm", codec="libvpx"), config=VideoConfig(num_frames=20))
    assert [_read_index(frame) for frame in clip.frames] == list(range(20))


@pytest.mark.parametrize(("clip_frames", "num_frames"), [(5, 12), (1, 4), (7, 16)])
def test_short_clip_repeats_frames_in_order(clip_frames, num_frames):
    clip = load_video(_clip_bytes(clip_frames), config=VideoConfig(num_frames=num_frames))
    indices = [_read_index(frame) for frame in clip.frames]
    assert len(indices) == num_frames
    assert indices == _expected_indices(clip_frames, num_frames)
    assert indices == sorted(indices)
    assert set(indices) == set(range(clip_frames))  # every frame of the clip appears
    counts = np.bincount(indices)
    assert counts.min() >= num_frames // clip_frames and counts.max() <= -(-num_frames // clip_frames)


def test_path_bytes_and_file_objects_agree(tmp_path):
    data = _clip_bytes(9, fmt="matroska")
    path = tmp_path / "clip.mkv"
    path.write_bytes(data)
    config = VideoConfig(num_frames=5)
    results = [
        load_video(source, config=config)
        for source in (path, str(path), data, bytearray(data), memoryview(data), io.BytesIO(data))
    ]
    for clip in results:
        assert [_read_index(f) for f in clip.frames] == _expected_indices(9, 5)
        assert clip.timestamps == results[0].timestamps
    for clip in results[1:]:
        assert all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip.frames, results[0].frames)
        )


# ----------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize(
    ("fmt", "rotation", "hflip", "vflip"),
    [
        ("mp4", 0, False, False),
        ("mp4", 90, False, False),
        ("mp4", -90, False, False),
        ("mp4", 180, False, False),
        ("mp4", 0, True, False),
        ("mp4", 90, True, False),
        ("mp4", 270, False, True),
        ("mov", 90, False, False),
        ("matroska", -90, False, False),
    ],
)
def test_display_matrix_is_applied(fmt, rotation, hflip, vflip):
    # An asymmetric picture (bright block top-left, grey strip beside it) on a 64x32 frame.
    source = np.zeros((32, 64, 3), dtype=np.uint8)
    source[:12, :20] = 255
    source[:6, 20:40] = 128
    buffer = io.BytesIO()
    _write_clip(buffer, [source] * 3, fmt=fmt, rotation=rotation, hflip=hflip, vflip=vflip)
    # PyAV's writer documents the matrix as a counter-clockwise rotation, then the mirrors.
    expected = np.rot90(source, k=rotation // 90)
    expected = expected[:, ::-1] if hflip else expected
    expected = expected[::-1] if vflip else expected
    clip = load_video(buffer.getvalue(), config=VideoConfig(num_frames=2))
    for frame in clip.frames:
        got = np.asarray(frame)
        assert got.shape == expected.shape
        assert np.mean(np.abs(got.astype(np.int16) - expected.astype(np.int16))) < 8
    if not (hflip or vflip):
        assert clip.rotation % 360 == rotation % 360


# ----------------------------------------------------------------------------------- errors


def _truncated_faststart_mp4(tmp_path) -> bytes:
    # Index (moov) first, as downloads are usually prepared, so a cut file still opens.
    path = tmp_path / "faststart.mp4"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (32, 64, 3), dtype=np.uint8) for _ in range(20)]
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    return data[: len(data) // 2]


def _empty_video_track() -> bytes:
    """A Matroska file whose video track exists but holds no frame (the audio track has some)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        video = container.add_stream("h264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 32, "yuv420p"
        audio = container.add_stream("aac", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 48000
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
        container.mux(video.encode())
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp: np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes(),
            "not a readable",
        ),
        (lambda tmp: b"", "not a readable"),
        (lambda tmp: b"\x00\x00\x00\x18ftypmp42" + bytes(200), "not a readable|no streams"),
        (lambda tmp: _clip_bytes(20)[:2000], "not a readable|no streams"),  # index at the end: cut off
        (_truncated_faststart_mp4, "truncated video"),
        (
            lambda tmp: (d := _clip_bytes(20, fmt="webm", codec="libvpx"))[: len(d) * 6 // 10],
            "truncated video",
        ),
        (lambda tmp: _audio_only("mp4", "aac"), "audio-only"),
        (lambda tmp: _audio_only("webm", "libopus"), "audio-only"),
        (lambda tmp: _audio_only("wav", "pcm_s16le"), "allowed container format"),
        (lambda tmp: _empty_video_track(), "empty video"),
    ],
    ids=[
        "random",
        "empty",
        "header-only",
        "cut-mp4",
        "cut-faststart-mp4",
        "cut-webm",
        "audio-m4a",
        "audio-webm",
        "wav",
        "no-frames",
    ],
)
def test_unusable_data_gives_clear_error(tmp_path, make, message):
    with pytest.raises(VideoError, match=message):
        load_video(make(tmp_path), config=VideoConfig(num_frames=4))


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (dict(max_bytes=1000), "max_bytes=1000"),
        (dict(max_pixels_per_frame=96 * 32 - 1), "max_pixels_per_frame"),
        (dict(max_seconds=1.5), "over max_seconds=1.5"),  # declared by the header
        (dict(max_stream_frames=10), "max_stream_frames=10"),
    ],
)
def test_limits(tmp_path, limits, message):
    data = _clip_bytes(20)  # 2 s, 96x32
    assert len(data) > 1000
    with pytest.raises(VideoError, match=message):
        load_video(data, config=VideoConfig(num_frames=4, **limits))
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    with pytest.raises(VideoError, match=message):
        load_video(path, config=VideoConfig(num_frames=4, **limits))
    load_video(data, config=VideoConfig(num_frames=4))  # within the default limits


class _Unseekable(io.RawIOBase):
    """A live-stream sink: the muxer cannot go back to write the duration into the header."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:
        self.data += bytes(chunk)
        return len(chunk)


def test_stream_without_declared_duration_is_capped_while_reading():
    sink = _Unseekable()
    _write_clip(sink, [_index_frame(i) for i in range(30)], fmt="matroska", fps=10)
    data = bytes(sink.data)
    with av.open(io.BytesIO(data)) as container:  # the header really declares no duration
        assert container.duration is None and container.streams.video[0].duration is None
        assert "DURATION" not in container.streams.video[0].metadata
    with pytest.raises(VideoError, match="longer than max_seconds=2"):
        load_video(data, config=VideoConfig(num_frames=4, max_seconds=2))
    clip = load_video(data, config=VideoConfig(num_frames=6))
    assert clip.duration == pytest.approx(3.0)
    assert [_read_index(frame) for frame in clip.frames] == _expected_indices(30, 6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_frames"):
        VideoConfig(num_frames=0)
    with pytest.raises(ValueError, match="max_seconds"):
        VideoConfig(max_seconds=0)
    with pytest.raises(TypeError):
        VideoConfig(16)  # keyword-only


# ----------------------------------------------------------------------------------- to tensor


def test_frames_to_tensor_matches_mllama_single_tile():
    from transformers import MllamaImageProcessor

    rng = np.random.default_rng(0)
    sizes = [(96, 32), (20, 50), (7, 7), (28, 28), (40, 29), (30, 17), (17, 30)]  # wide, tall, up, exact, odd
    frames = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    processor = MllamaImageProcessor(
        max_image_tiles=1,
        size={"height": 28, "width": 28},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    expected = torch.as_tensor(
        np.asarray(processor(images=[[f] for f in frames], return_tensors="pt")["pixel_values"])
    )[:, 0, 0]
    got = frames_to_tensor(frames, 28)
    assert got.shape == (7, 3, 28, 28) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- aggregator


def _aggregator(**kwargs) -> TemporalAggregator:
    torch.manual_seed(0)
    agg = TemporalAggregator(dim=32, num_heads=4, num_layers=2, ffn_dim=48, **kwargs).eval()
    with torch.no_grad():  # make the norms matter too
        for name, param in agg.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return agg


@pytest.mark.parametrize(("frames", "group", "merged"), [(16, 16, 1), (64, 32, 2), (64, None, 2), (6, 3, 2)])
def test_aggregator_shapes(frames, group, merged):
    agg = _aggregator()
    x = torch.randn(2, frames, 3, 5, 32)  # [b, f, t, p, d]
    out = agg(x, group_size=group)
    assert out.shape == (2, merged, 3, 5, 32)
    assert torch.isfinite(out).all()


def test_aggregator_rejects_bad_input():
    agg = _aggregator(group_size=8)
    with pytest.raises(ValueError, match="groups of 8"):
        agg(torch.randn(1, 12, 1, 2, 32))
    with pytest.raises(ValueError, match="group_size must be in 1..8"):
        agg(torch.randn(1, 16, 1, 2, 32), group_size=16)
    with pytest.raises(ValueError, match=r"expected frames \[b, f, t, p, 32\]"):
        agg(torch.randn(1, 8, 2, 16))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TemporalAggregator(dim=30, num_heads=4)


def test_groups_and_positions_are_merged_independently():
    agg = _aggregator()
    x = torch.randn(2, 12, 2, 3, 32)
    out = agg(x, group_size=4)
    order = order_embedding(3, 32)[:, None, None]  # [n, 1, 1, d]: merged frame n's place
    for g in range(3):  # each group alone gives the same merged frame, but for its place embedding
        alone = agg(x[:, 4 * g : 4 * g + 4], group_size=4)[:, 0] - order[0]
        torch.testing.assert_close(out[:, g] - order[g], alone)
    for i in range(2):  # so does each sample, and each (tile, patch) position
        torch.testing.assert_close(out[i : i + 1], agg(x[i : i + 1], group_size=4))
    torch.testing.assert_close(out[:, :, 1:, 2:], agg(x[:, :, 1:, 2:], group_size=4))


def test_frame_order_matters_through_temporal_embeddings():
    agg = _aggregator()
    x = torch.randn(1, 8, 2, 3, 32)
    swapped = x[:, [1, 0, 2, 3, 4, 5, 6, 7]]  # swap two frames inside the first group of 4
    out, out_swapped = agg(x, group_size=4), agg(swapped, group_size=4)
    assert (out[:, 0] - out_swapped[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(out[:, 1], out_swapped[:, 1])
    with torch.no_grad():  # without temporal embeddings attention is blind to the order
        agg.time_embed.zero_()
    torch.testing.assert_close(agg(x, group_size=4), agg(swapped, group_size=4))


def test_merged_frames_carry_their_order():
    agg = _aggregator()
    x = torch.randn(1, 8, 2, 3, 32)
    out = agg(x, group_size=4)
    swapped = agg(x[:, [4, 5, 6, 7, 0, 1, 2, 3]], group_size=4)  # the two groups in the other order
    order = order_embedding(2, 32)
    # Merged frames are not merely permuted: each carries the place it has in the clip.
    torch.testing.assert_close(swapped[:, 0] - order[0], out[:, 1] - order[1])
    assert (swapped[:, 0] - out[:, 1]).abs().max() > 0.1
    emb = order_embedding(16, 32)
    torch.testing.assert_close(emb.pow(2).mean(-1), torch.ones(16))
    assert torch.linalg.matrix_rank(emb) > 8  # distinct places, not one repeated vector


def test_perceiver_layer_matches_torch_multihead_attention():
    torch.manual_seed(0)
    layer = PerceiverLayer(dim=32, num_heads=4, ffn_dim=48, norm_eps=1e-5).eval()
    reference = torch.nn.MultiheadAttention(32, 4, bias=False, batch_first=True).eval()
    with torch.no_grad():
        for norm in (layer.frame_norm, layer.latent_norm, layer.mlp_norm):
            norm.weight.add_(torch.randn(32) * 0.1)
        reference.in_proj_weight.copy_(
            torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
        )
        reference.out_proj.weight.copy_(layer.o_proj.weight)
    latents, frames = torch.randn(6, 1, 32), torch.randn(6, 5, 32)
    query = layer.latent_norm(latents)
    context = torch.cat([layer.frame_norm(frames), query], dim=1)
    expected = latents + reference(query, context, context, need_weights=False)[0]
    expected = expected + layer.mlp(layer.mlp_norm(expected))
    torch.testing.assert_close(layer(latents, frames), expected)


def test_row_chunking_gives_the_same_result(monkeypatch):
    agg = _aggregator()
    x = torch.randn(2, 8, 3, 4, 32)
    full = agg(x, group_size=4)
    monkeypatch.setattr(temporal_aggregator, "_MAX_SDPA_ROWS", 5)  # 48 rows in chunks of 5
    torch.testing.assert_close(agg(x, group_size=4), full)


def test_aggregator_gradients_reach_every_parameter_and_the_input():
    agg = _aggregator().train()
    x = torch.randn(1, 8, 2, 3, 32, requires_grad=True)
    agg(x, group_size=4).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in agg.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Only the first 4 temporal embeddings were used.
    assert agg.time_embed.grad[4:].abs().sum() == 0 and agg.time_embed.grad[:4].abs().sum() > 0
