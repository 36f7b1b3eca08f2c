"""Video decoding for the video adapter: exactly N frames, upright, within hard limits.

Llama 3 (section 7.2, "Video adapter") feeds a clip to the model as a fixed number of frames
sampled uniformly over it (16 in pre-training, 64 in SFT), each preprocessed like a single-tile
image and passed through the image encoder one by one. This module turns an mp4 / webm / mkv /
mov file into those frames with PyAV (torchvision's video reader is gone):

* ``load_video`` decodes a clip into a ``VideoClip`` of exactly ``num_frames`` RGB frames in
  display orientation (rotation and flips of the container's display matrix applied).
* ``check_video`` runs the same checks and decodes only the first frame: whether a clip is
  usable, for ``mm data pack``, which stores clips as they are.
* ``frames_to_tensor`` prepares each frame as a one-tile image with ``ImageProcessor`` (resize
  without distortion, pad, CLIP normalisation): ``[f, 3, tile, tile]``.

Sampling, precisely. Let the clip's video timeline be ``[start, end)``, where ``start`` is the
earliest presentation time of a video packet and ``end`` the latest presentation time plus that
packet's duration, both measured by reading the packets (not trusted from the header). Cut it into
``num_frames`` equal segments; target ``k`` is the centre of segment ``k``,
``start + (k + 0.5) * (end - start) / num_frames``, and the frame sampled for it is the one *on
screen* at that time: the last decoded frame whose timestamp is ``<=`` the target (the first frame
if none is). Timestamps are exact fractions, so for a constant-rate clip of ``F`` frames the
sampled frame indices are exactly ``floor((k + 0.5) * F / num_frames)``:

* ``F >= num_frames``: distinct frames spread evenly over the clip, in time order.
* ``F < num_frames`` (a clip with fewer frames than asked): frames repeat, each about
  ``num_frames / F`` times in a row, so the result always has exactly ``num_frames`` frames in
  non-decreasing time order, and every frame of the clip appears at least once.

Limits. Every clip passes hard, configurable caps before and while decoding, and anything that
cannot be read gives a ``VideoError`` naming what was wrong: unreadable or corrupt data, a
container format outside the allow-list (FFmpeg never probes playlists or other demuxers that
would open further files), no video stream (audio-only files included; cover art does not count
as video), a video stream without frames, too many bytes (checked before anything is parsed),
too many pixels per frame (from the header and again on every decoded frame), too long (from the
header, and again from packet timestamps while reading, which also stops streams that never
declare their duration), a budget of packets / decoded frames that stops streams whose
timestamps never advance, and truncation (the packets stop more than 5% and two frame intervals
short of the duration the header declares for the video). Decoding stops at the last target, and
containers and files are always closed.

Shapes: f frames, tile the tile size in pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import torch
from av.sidedata.sidedata import Type as SideDataType
from PIL import Image

from mm.datasets._media_file import check_media_path
from mm.datasets.image_processing import CLIP_MEAN, CLIP_STD, ImageProcessor

__all__ = [
    "VideoClip",
    "VideoConfig",
    "VideoError",
    "check_video",
    "frames_to_tensor",
    "load_video",
]

# Fraction of the declared duration a stream may fall short of before it counts as truncated.
TRUNCATION_TOLERANCE = Fraction(1, 20)

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


class VideoError(ValueError):
    """A clip that cannot be used: unreadable, without video, or over one of the limits."""


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """How to decode a clip and the limits it must respect.

    Attributes:
        num_frames: frames returned per clip (Llama 3 section 7.2: 16 in pre-training, 64 in SFT).
        max_seconds: longest accepted video stream, in seconds.
        max_pixels_per_frame: largest accepted ``width * height`` of a coded frame.
        max_bytes: largest accepted input, in bytes; checked before any parsing.
        max_stream_frames: most packets demuxed and frames decoded for one clip, a budget that
            stops crafted streams whose timestamps never advance.
        formats: FFmpeg demuxers allowed to open the data (``mov`` covers mp4 / mov / m4a,
            ``matroska`` covers mkv / webm).
    """

    num_frames: int = 16
    max_seconds: float = 600.0
    max_pixels_per_frame: int = 3840 * 2160
    max_bytes: int = 1 << 30
    max_stream_frames: int = 100_000
    formats: tuple[str, ...] = ("mov", "mp4", "matroska", "webm")

    def __post_init__(self) -> None:
        for name in ("num_frames", "max_pixels_per_frame", "max_bytes", "max_stream_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoConfig.{name} must be a positive integer, got {value!r}")
        if not self.max_seconds > 0:
            raise ValueError(f"VideoConfig.max_seconds must be positive, got {self.max_seconds!r}")
        if not self.formats:
            raise ValueError("VideoConfig.formats must name at least one container format")


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from one clip.

    Attributes:
        frames: exactly ``num_frames`` RGB images in display orientation, at coded resolution.
        timestamps: presentation time of each sampled frame, seconds from the clip's start.
        duration: length of the video timeline in seconds (``end - start``, see the module doc).
        fps: average frame rate declared by the stream, or ``None`` when it declares none.
        rotation: the rotation FFmpeg reports for the stream's display matrix, in degrees
            counter-clockwise (0 without one). The whole matrix is applied to the frames,
            mirroring included.
    """

    frames: list[Image.Image]
    timestamps: list[float]
    duration: float
    fps: float | None
    rotation: int


def load_video(source: VideoSource, *, config: VideoConfig | None = None) -> VideoClip:
    """Decode ``config.num_frames`` frames sampled uniformly over a clip (Llama 3 section 7.2).

    Args:
        source: a path, the file's bytes, or a readable binary file object (read from its current
            position, at most ``max_bytes + 1`` bytes of it).
        config: sampling and limits; the defaults of ``VideoConfig`` when ``None``.

    Returns:
        The sampled frames, upright, with their timestamps (see the module docstring for the
        exact sampling rule and what happens to clips with fewer frames than asked).

    Raises:
        VideoError: the data is not a readable video in an allowed format, has no video stream
            or no frames, or exceeds a limit of ``config``.
    """
    config = config or VideoConfig()
    with _naming(source):
        data = _read_source(source, config.max_bytes)
        try:
            start, end, fps = _measure_timeline(data, config)
            targets = [
                start + (end - start) * Fraction(2 * k + 1, 2 * config.num_frames)
                for k in range(config.num_frames)
            ]
            chosen = _decode_at(data, targets, config)
        except av.FFmpegError as err:
            raise VideoError(f"corrupt or unreadable video data: {err}") from err
    frames, times, rotations = zip(*chosen, strict=True)
    return VideoClip(
        frames=list(frames),
        timestamps=[float(t - start) for t in times],
        duration=float(end - start),
        fps=fps,
        rotation=rotations[0],
    )


def check_video(source: VideoSource, *, config: VideoConfig | None = None) -> float:
    """Check that a clip is usable without sampling it, for writers that store it as it is.

    The same checks as :func:`load_video` (allowed container, a video stream within the limits,
    packets that cover the duration the header declares: not truncated), then only the first frame
    is decoded, to prove the codec reads the data. Much cheaper than sampling the clip.

    Args:
        source: as for :func:`load_video`.
        config: the limits; ``num_frames`` is not used. The defaults of ``VideoConfig`` when ``None``.

    Returns:
        The length of the video timeline in seconds.

    Raises:
        VideoError: as :func:`load_video`.
    """
    config = config or VideoConfig()
    with _naming(source):
        data = _read_source(source, config.max_bytes)
        try:
            start, end, _ = _measure_timeline(data, config)
            with _open(data, config) as container:
                stream = _video_stream(container, config)
                with contextlib.closing(_timed_frames(container, stream, config)) as timed:
                    if next(timed, None) is None:
                        raise VideoError("empty video: no frame could be decoded")
        except av.FFmpegError as err:
            raise VideoError(f"corrupt or unreadable video data: {err}") from err
    return float(end - start)


def frames_to_tensor(
    frames: list[Image.Image],
    tile_size: int,
    *,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    resample: str = "bilinear",
) -> torch.Tensor:
    """Preprocess frames as single-tile images: one tile per frame (Llama 3 section 7.2).

    Each frame goes through ``ImageProcessor`` with ``max_tiles=1``, so frames are prepared exactly
    like images for the same image encoder: resized without distortion to fit the tile, padded at
    the bottom and right, normalised with ``mean`` / ``std``.

    Args:
        frames: RGB images (for example ``VideoClip.frames``).
        tile_size: side of the square tile in pixels.
        mean: per-channel mean (CLIP's by default).
        std: per-channel standard deviation (CLIP's by default).
        resample: resize interpolation, as for ``ImageProcessor``.

    Returns:
        Float32 tensor ``[f, 3, tile, tile]``.
    """
    if not frames:
        raise ValueError("frames_to_tensor needs at least one frame")
    largest = max(frame.width * frame.height for frame in frames)
    processor = ImageProcessor(
        tile_size, 1, mean=mean, std=std, max_image_pixels=max(largest, 1), resample=resample
    )
    return torch.cat([processor.tile(frame)[0] for frame in frames])  # [f, 3, tile, tile]


@contextlib.contextmanager
def _naming(source: VideoSource) -> Iterator[None]:
    """Name the file in a ``VideoError`` about a clip given by its path."""
    try:
        yield
    except VideoError as err:
        if not isinstance(source, (str, os.PathLike)) or str(err).startswith("video file "):
            raise
        raise VideoError(f"video file {os.fspath(source)!r}: {err}") from err


def _read_source(source: VideoSource, max_bytes: int) -> bytes | str | os.PathLike:
    """Check the byte cap without reading past it; paths stay paths, everything else becomes bytes."""
    if isinstance(source, (str, os.PathLike)):
        check_media_path(source, kind="video", error=VideoError, max_bytes=max_bytes)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise TypeError(
            f"video source must be a path, bytes or a binary file object, got {type(source).__name__}"
        )
    if len(data) > max_bytes:
        raise VideoError(f"video data has more than max_bytes={max_bytes} bytes")
    return data


@contextlib.contextmanager
def _open(data: bytes | str | os.PathLike, config: VideoConfig) -> Iterator[av.container.InputContainer]:
    """Open with FFmpeg limited to the allowed demuxers; paths are read through Python, not FFmpeg."""
    with open(data, "rb") if isinstance(data, (str, os.PathLike)) else io.BytesIO(data) as file:
        try:
            container = av.open(file, "r", container_options={"format_whitelist": ",".join(config.formats)})
        except av.FFmpegError as err:
            raise VideoError(
                f"not a readable video in an allowed container format ({', '.join(config.formats)}): "
                f"{'FFmpeg recognises none in it' if err.strerror == 'Invalid argument' else err.strerror or err}"
            ) from err
        with container:
            yield container


def _video_stream(container: av.container.InputContainer, config: VideoConfig) -> av.VideoStream:
    """The first real video stream (cover art excluded), checked against the header limits."""
    video = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not video:
        if container.streams.audio:
            raise VideoError("audio-only file: the container has audio but no video stream")
        if not container.streams:
            raise VideoError("no streams found: the file is empty, truncated or corrupt")
        raise VideoError("no video stream in the container")
    stream = video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > config.max_pixels_per_frame:
        raise VideoError(
            f"frame size {width}x{height} is over max_pixels_per_frame={config.max_pixels_per_frame}"
        )
    declared = _declared_seconds(container, stream)
    if declared is not None and declared > config.max_seconds:
        raise VideoError(f"video declares {float(declared):.1f} s, over max_seconds={config.max_seconds}")
    return stream


def _declared_seconds(container: av.container.InputContainer, stream: av.VideoStream) -> Fraction | None:
    """The video stream's duration as the header declares it, or ``None`` when it declares none.

    mp4 / mov declare it per stream; FFmpeg and mkvmerge write it into a Matroska track's
    ``DURATION`` tag; a container holding only this stream declares it for the container.
    """
    if stream.duration is not None and stream.time_base is not None:
        return stream.duration * stream.time_base
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return (int(hours) * 60 + int(minutes)) * 60 + Fraction(seconds)
        except ValueError:
            pass
    if len(container.streams) == 1 and container.duration is not None:
        return Fraction(container.duration, av.time_base)
    return None


def _measure_timeline(
    data: bytes | str | os.PathLike, config: VideoConfig
) -> tuple[Fraction, Fraction, float | None]:
    """Read the video packets (no decoding) to find the timeline ``[start, end)`` exactly."""
    with _open(data, config) as container:
        stream = _video_stream(container, config)
        declared = _declared_seconds(container, stream)
        rate = stream.average_rate or None
        time_base = stream.time_base
        start = end = None
        count = 0
        for packet in container.demux(stream):
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None or packet.is_discard:  # the flush packet, or one an edit list drops
                continue
            count += 1
            if count > config.max_stream_frames:
                raise VideoError(f"video has more than max_stream_frames={config.max_stream_frames} packets")
            time = pts * time_base
            stop = time + (packet.duration or 0) * time_base
            start = time if start is None else min(start, time)
            end = stop if end is None else max(end, stop)
            if end - start > config.max_seconds:
                raise VideoError(f"video runs longer than max_seconds={config.max_seconds}")
    if start is None:
        raise VideoError("empty video: the video stream has no frames")
    interval = 1 / Fraction(rate) if rate else Fraction(0)
    if end == start:  # one frame without a duration: give it one frame interval
        end = start + interval
    # Declared durations are rounded and may count a last frame the packets give no duration, so
    # a little is tolerated; a stream that stops well short of its header was cut off.
    if declared is not None and declared - (end - start) > max(TRUNCATION_TOLERANCE * declared, 2 * interval):
        raise VideoError(
            f"truncated video: the header declares {float(declared):.2f} s but the data hold only "
            f"{float(end - start):.2f} s"
        )
    return start, end, (float(rate) if rate else None)


def _decode_at(
    data: bytes | str | os.PathLike, targets: list[Fraction], config: VideoConfig
) -> list[tuple[Image.Image, Fraction, int]]:
    """For each target time, the frame on screen then: ``(upright image, timestamp, rotation)``."""
    chosen: list[tuple[Image.Image, Fraction, int]] = []
    previous = None  # (frame, time) of the last frame at or before the current target
    converted = None  # the image of `previous`, converted once however often it is chosen
    with _open(data, config) as container:
        stream = _video_stream(container, config)
        stream.thread_type = "AUTO"
        with contextlib.closing(_timed_frames(container, stream, config)) as timed:
            for frame, time in timed:
                while len(chosen) < len(targets) and time > targets[len(chosen)]:
                    if previous is None:  # a target before the first frame takes the first frame
                        previous = (frame, time)
                    if converted is None:
                        converted = _upright(previous[0])
                    chosen.append((converted[0], previous[1], converted[1]))
                if len(chosen) == len(targets):
                    break  # decode nothing past the last target
                if previous is None or previous[0] is not frame:
                    previous, converted = (frame, time), None
        if previous is None:
            raise VideoError("empty video: no frame could be decoded")
        while len(chosen) < len(targets):  # targets after the last frame take the last frame
            converted = converted or _upright(previous[0])
            chosen.append((converted[0], previous[1], converted[1]))
    return chosen


def _timed_frames(
    container: av.container.InputContainer, stream: av.VideoStream, config: VideoConfig
) -> Iterator[tuple[av.VideoFrame, Fraction]]:
    """Decoded frames with exact timestamps, within the pixel cap and the frame budget."""
    last = Fraction(0)
    interval = 1 / Fraction(stream.average_rate) if stream.average_rate else Fraction(0)
    for count, frame in enumerate(container.decode(stream), start=1):
        if count > config.max_stream_frames:
            raise VideoError(
                f"video decodes to more than max_stream_frames={config.max_stream_frames} frames"
            )
        if frame.width * frame.height > config.max_pixels_per_frame:
            raise VideoError(
                f"decoded frame size {frame.width}x{frame.height} is over "
                f"max_pixels_per_frame={config.max_pixels_per_frame}"
            )
        # A frame without a timestamp follows the previous one by one frame interval.
        last = frame.pts * stream.time_base if frame.pts is not None else last + interval
        yield frame, last


def _upright(frame: av.VideoFrame) -> tuple[Image.Image, int]:
    """The frame as an RGB image turned by its display matrix, and the rotation that was applied.

    FFmpeg's display matrix maps a source pixel ``(x, y)`` to ``(a x + c y, b x + d y)`` (plus a
    translation) with ``[a, b, ., c, d, ...]`` the first entries of the 3x3 matrix. Snapped to
    the nearest right angle it is one of the eight orientations (rotations by 90 degrees, with or
    without a mirror); this gives the same picture as the ``ffmpeg`` command's autorotation.
    """
    image = frame.to_image()
    side_data = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    if side_data is None:
        return image, 0
    a, b, _, c, d = struct.unpack("=9i", bytes(side_data))[:5]
    if abs(a) >= abs(b):  # x stays horizontal: mirrors only
        steps = [Image.Transpose.FLIP_LEFT_RIGHT] if a < 0 else []
        steps += [Image.Transpose.FLIP_TOP_BOTTOM] if d < 0 else []
    else:  # x becomes vertical: swap the axes, then mirror
        steps = [Image.Transpose.TRANSPOSE]
        steps += [Image.Transpose.FLIP_TOP_BOTTOM] if b < 0 else []
        steps += [Image.Transpose.FLIP_LEFT_RIGHT] if c < 0 else []
    for step in steps:
        image = image.transpose(step)
    return image, frame.rotation
