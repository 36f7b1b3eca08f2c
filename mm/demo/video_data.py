"""Video questions of ``mm demo``: moving-shapes clips whose questions no single frame answers.

``direction`` asks which way one shape moves (left / right / up / down), ``first`` which of 2-4
differently coloured shapes appeared first (one of the four colours) and ``crossing`` how many of
three shapes, each moving sideways in its own horizontal lane, cross the vertical middle line (0-3)
(:data:`~mm.demo.scenes.VIDEO_KINDS`). Training clips never show a colour-shape pair of
:data:`~mm.demo.scenes.HELDOUT_COLOUR_SHAPE` (e.g. a red triangle); every evaluation clip shows one.
:func:`write_video_qa_folder` writes ``KEY.mp4`` + ``KEY.json`` folders for ``mm data pack``;
:func:`write_mp4` encodes H.264.

Shapes: f frames.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mm.demo._sampling import check_count, check_kinds, pick_question, plan_answers, sample_rng, write_folder
from mm.demo.scenes import (
    CHOICES,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    MARGIN,
    POSITIONS,
    SHAPES,
    VIDEO_KINDS,
    PlacedShape,
    ShapeScene,
    draw_scene,
    place_in_quadrant,
)

__all__ = ["VideoQASample", "make_video_qa", "video_qa_messages", "write_mp4", "write_video_qa_folder"]

_LANE_SIZE = (0.20, 0.24)  # shapes of the three crossing lanes (a lane is a third of the height)


@dataclass(frozen=True, kw_only=True)
class VideoQASample:
    """One video question.

    Attributes:
        frames: the clip's RGB frames, ``[f]``.
        question: the user's question.
        answer: the short answer, one of ``choices``.
        kind: ``"direction"``, ``"first"`` or ``"crossing"``.
        choices: the four possible answers of this kind (:data:`CHOICES`).
        scenes: the scene of each frame, ``[f]``.
    """

    frames: list[Image.Image]
    question: str
    answer: str
    kind: str
    choices: tuple[str, ...]
    scenes: tuple[ShapeScene, ...]


def _pick_pair(rng: random.Random, novel: bool) -> tuple[str, str]:
    """A (colour, shape) pair that is held out (``novel``) or not."""
    while True:
        pair = (rng.choice(COLOURS), rng.choice(SHAPES))
        if (pair in HELDOUT_COLOUR_SHAPE) == novel:
            return pair


def _direction_frames(rng: random.Random, answer: str, split: str, num_frames: int) -> list[ShapeScene]:
    colour, shape = _pick_pair(rng, split == "eval")
    size = rng.uniform(0.26, 0.32)
    lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    travel = rng.uniform(0.35, min(0.5, hi - lo))
    start = rng.uniform(lo, hi - travel)  # a random stretch: no single frame tells the direction
    sign = 1 if answer in ("right", "down") else -1
    if sign < 0:
        start += travel
    across = rng.uniform(lo, hi)
    scenes = []
    for k in range(num_frames):
        along = start + sign * travel * k / (num_frames - 1)
        x, y = (along, across) if answer in ("left", "right") else (across, along)
        scenes.append(ShapeScene(shapes=(PlacedShape(shape, colour, size, x, y),)))
    return scenes


def _first_frames(rng: random.Random, answer: str, split: str, num_frames: int) -> list[ShapeScene]:
    count = rng.randint(2, 4)
    colours = [answer, *rng.sample([c for c in COLOURS if c != answer], count - 1)]
    while True:
        shapes = [rng.choice(SHAPES) for _ in colours]
        if any(pair in HELDOUT_COLOUR_SHAPE for pair in zip(colours, shapes)) == (split == "eval"):
            break
    items = [
        place_in_quadrant(rng, s, c, p) for s, c, p in zip(shapes, colours, rng.sample(POSITIONS, count))
    ]
    gap = (num_frames - 2) // count  # appearances at least this many frames apart
    first = rng.randrange(gap)
    times = [first + i * gap for i in range(count)]
    return [
        ShapeScene(shapes=tuple(item for item, t in zip(items, times) if t <= k)) for k in range(num_frames)
    ]


def _crossing_frames(rng: random.Random, answer: str, split: str, num_frames: int) -> list[ShapeScene]:
    crossers = set(rng.sample(range(3), int(answer)))
    while True:
        pairs = [(rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(3)]
        if any(pair in HELDOUT_COLOUR_SHAPE for pair in pairs) == (split == "eval"):
            break
    paths = []
    for lane, (colour, shape) in enumerate(pairs):
        size = rng.uniform(*_LANE_SIZE)
        lo, hi = size / 2 + MARGIN, 0.5 - size / 2 - 0.02  # a body in [lo, hi] stays off the middle
        if lane in crossers:  # from one half, fully, into the other
            start, end = rng.uniform(lo, hi), 1 - rng.uniform(lo, hi)
        else:  # moves visibly but stays in its half
            start = rng.uniform(lo, hi - 0.1)
            end = rng.uniform(start + 0.1, hi)
            if rng.random() < 0.5:
                start, end = 1 - start, 1 - end
        if rng.random() < 0.5:
            start, end = end, start
        paths.append((shape, colour, size, start, end, (2 * lane + 1) / 6))
    return [
        ShapeScene(
            shapes=tuple(
                PlacedShape(shape, colour, size, start + (end - start) * k / (num_frames - 1), y)
                for shape, colour, size, start, end, y in paths
            )
        )
        for k in range(num_frames)
    ]


_VIDEO_SCENES = {"direction": _direction_frames, "first": _first_frames, "crossing": _crossing_frames}


def make_video_qa(
    num_samples: int,
    *,
    split: str,
    seed: int,
    num_frames: int = 16,
    size: int = 56,
    kinds: Sequence[str] = VIDEO_KINDS,
    heldout_phrasings: bool = False,
) -> list[VideoQASample]:
    """Questions about generated moving-shapes clips, which no single frame answers.

    Held-out colour-shape pairs (:data:`HELDOUT_COLOUR_SHAPE`) never appear in ``"train"`` clips
    and appear in every ``"eval"`` clip (held-out phrasings only with ``heldout_phrasings``). In ``first``
    clips, appearances are at least ``(num_frames - 2) // 4`` frames apart.

    Args:
        num_samples: how many clips.
        split: ``"train"`` or ``"eval"``.
        seed: the seed; the same arguments give the same clips.
        num_frames: frames per clip, at least 8 (Llama 3 section 7.2 samples 16 in pre-training).
        size: frame side in pixels; even, as H.264 in yuv420p needs.
        kinds: the question kinds to draw from (:data:`VIDEO_KINDS`), balanced.
        heldout_phrasings: also ask with the wordings never used in training (``eval`` only).

    Returns:
        ``num_samples`` :class:`VideoQASample` s, balanced over kinds and answers.
    """
    check_count("num_samples", num_samples)
    if not isinstance(num_frames, int) or num_frames < 8:
        raise ValueError(f"num_frames must be an int >= 8, got {num_frames!r}")
    if not isinstance(size, int) or size < 8 or size % 2:
        raise ValueError(f"size must be an even int >= 8 (H.264 yuv420p), got {size!r}")
    kinds = check_kinds(kinds, VIDEO_KINDS)
    rng = sample_rng("video", split, seed)
    samples = []
    for kind, answer in plan_answers(rng, num_samples, kinds):
        scenes = _VIDEO_SCENES[kind](rng, answer, split, num_frames)
        samples.append(
            VideoQASample(
                frames=[draw_scene(scene, size) for scene in scenes],
                question=pick_question(rng, kind, heldout_phrasings and split == "eval"),
                answer=answer,
                kind=kind,
                choices=CHOICES[kind],
                scenes=tuple(scenes),
            )
        )
    return samples


def video_qa_messages(sample: VideoQASample, video_ref: Any = None) -> list[dict[str, Any]]:
    """Llama 3 chat messages of a video question: user [video, question], assistant answer.

    Args:
        sample: the sample.
        video_ref: what the video part holds, e.g. a media field ``"0.mp4"``; ``sample.frames``
            when None.
    """
    ref = sample.frames if video_ref is None else video_ref
    return [
        {
            "role": "user",
            "content": [{"type": "video", "video": ref}, {"type": "text", "text": sample.question}],
        },
        {"role": "assistant", "content": sample.answer},
    ]


def write_mp4(
    frames: Sequence[Image.Image], path: str | os.PathLike[str], fps: int = 8, *, crf: int = 18
) -> Path:
    """Encode frames as an H.264 (libx264, yuv420p) mp4 with constant frame rate.

    Args:
        frames: the frames, all of one even width and height.
        path: the file to write.
        fps: frames per second.
        crf: x264 constant rate factor (lower: better quality; 18 keeps the shapes' colours).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no frames, frames of different sizes, or an odd width or height.
    """
    if not frames:
        raise ValueError("write_mp4 needs at least one frame")
    arrays = [np.asarray(frame.convert("RGB")) for frame in frames]
    height, width = arrays[0].shape[:2]
    if any(a.shape[:2] != (height, width) for a in arrays):
        raise ValueError("all frames must have the same size")
    if width % 2 or height % 2:
        raise ValueError(f"H.264 in yuv420p needs an even width and height, got {width}x{height}")
    import av  # here, not at the top: text-corpus users should not pay for importing PyAV

    path = Path(path)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # No B-frames: with them, libx264 (as PyAV bundles it) encoded the same frames differently
        # from run to run on a busy machine (about 1 clip in 25), which made the video stage's
        # figures move between runs of one seed; with bframes=0 every byte repeats.
        stream.options = {"crf": str(crf), "x264-params": "bframes=0"}
        stream.codec_context.thread_count = 1  # tiny frames: threads cost more than they save
        for i, array in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_video_qa_folder(
    samples: Sequence[VideoQASample], out_dir: str | os.PathLike[str], *, fps: int = 8
) -> list[str]:
    """Write samples as ``KEY.mp4`` + ``KEY.json`` for :func:`mm.datasets.shards.pack`.

    Like :func:`write_image_qa_folder`, with a video part naming ``KEY.mp4`` (see :func:`write_mp4`).
    """
    return write_folder(
        samples, out_dir, "mp4", lambda s, path: write_mp4(s.frames, path, fps), video_qa_messages
    )
