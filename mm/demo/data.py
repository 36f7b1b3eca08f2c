"""Generated data for ``mm demo``: shapes images, moving-shapes videos and a text corpus.

The demo reproduces the compositional recipe of "The Llama 3 Herd of Models" (2024) in miniature
and offline: a tiny text backbone is pre-trained natively on :func:`make_text_corpus` (section 3),
frozen, and then image adapters (section 7.1-7.4) and later video adapters (section 7.2, "video
adapter") learn to answer questions about :func:`make_image_qa` images and :func:`make_video_qa`
clips. Nothing is downloaded; everything is drawn here, deterministically from a seed (every
function uses its own ``random.Random`` / ``numpy.random.Generator``, never the global ones).

**Vocabulary.** Four colours (:data:`COLOURS`), four shapes (:data:`SHAPES`), four positions
(:data:`POSITIONS`, the quadrants) and the counts 1-4. Every question kind has exactly four
answers (:data:`CHOICES`), so chance is 0.25 per kind. Colours are saturated and far apart, the
background is dark, shapes are large (26-36 % of the image side: 15-20 px at 56 px), never overlap
and lie fully inside their quadrant, so a tiny ViT can learn the tasks in a few hundred steps.

**Scenes.** A :class:`ShapeScene` holds :class:`PlacedShape` s whose centre and size are
*fractions of the image side*, so one scene renders at any resolution with :func:`draw_scene`.

**Image questions** (:data:`IMAGE_KINDS`): ``colour``, ``shape`` and ``position`` ask about the one
shape of a single-shape scene; ``count`` asks how many shapes (1-4, one per quadrant) a scene has.

**Video questions** (:data:`VIDEO_KINDS`), which no single frame answers: ``direction`` (which way
one shape moves: left / right / up / down), ``first`` (which of 2-4 differently coloured shapes
appeared first: one of the four colours) and ``crossing`` (how many of three shapes, each moving
sideways in its own horizontal lane, cross the vertical middle line: 0-3).

**Train / eval split with held-out combinations.** Training images never contain a colour-shape-
quadrant triple of :data:`HELDOUT_TRIPLES` (e.g. a red circle in the top left, although red circles,
red shapes in the top left and circles in the top left all appear); training videos never a
colour-shape pair of :data:`HELDOUT_COLOUR_SHAPE` (e.g. a red triangle). Every evaluation scene
contains at least one held-out combination, so evaluation measures generalisation, not
memorisation. Questions use the ``train`` phrasings of :data:`QUESTIONS`; evaluation can also use
the ``heldout`` ones (``heldout_phrasings=True``). The split name is mixed into the seed, so train
and eval never share a random stream.

**Balance.** Answers are drawn in shuffled blocks holding every (kind, answer) once, so any run of
samples is balanced over kinds and answers up to one unfinished block.

**Files.** :func:`write_image_qa_folder` and :func:`write_video_qa_folder` write ``KEY.png`` /
``KEY.mp4`` + ``KEY.json`` folders in mm's sample schema (:mod:`mm.datasets.shards`) that
:func:`mm.datasets.shards.pack` turns into webdataset shards; :func:`write_mp4` encodes H.264.

Shapes: f frames.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from mm._io import atomic_dir

__all__ = [
    "BACKGROUND",
    "CHOICES",
    "COLOURS",
    "COLOUR_RGB",
    "COUNTS",
    "OUTLINE",
    "CROSSINGS",
    "DIRECTIONS",
    "HELDOUT_COLOUR_SHAPE",
    "HELDOUT_TRIPLES",
    "IMAGE_KINDS",
    "POSITIONS",
    "QUESTIONS",
    "SHAPES",
    "VIDEO_KINDS",
    "Phrasings",
    "PlacedShape",
    "QASample",
    "ShapeScene",
    "VideoQASample",
    "draw_scene",
    "heldout_text",
    "is_novel",
    "make_image_qa",
    "make_text_corpus",
    "make_video_qa",
    "qa_messages",
    "quadrant",
    "video_qa_messages",
    "write_image_qa_folder",
    "write_mp4",
    "write_video_qa_folder",
]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COUNTS: tuple[str, ...] = ("1", "2", "3", "4")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
CROSSINGS: tuple[str, ...] = ("0", "1", "2", "3")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 90, 255),
    "yellow": (245, 220, 20),
}
"""Saturated, far-apart colours: every pair differs by at least 150 in some channel."""
BACKGROUND: tuple[int, int, int] = (20, 20, 20)
OUTLINE: tuple[int, int, int] = (255, 255, 255)
"""Every shape's outline colour (see :func:`draw_scene`)."""

IMAGE_KINDS: tuple[str, ...] = ("colour", "shape", "count", "position")
VIDEO_KINDS: tuple[str, ...] = ("direction", "first", "crossing")
CHOICES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "count": COUNTS,
    "position": POSITIONS,
    "direction": DIRECTIONS,
    "first": COLOURS,
    "crossing": CROSSINGS,
}
"""The four possible answers of each question kind."""

# Images hold out whole (colour, shape, quadrant) triples: 8 of the 64, each colour, shape and
# quadrant in exactly two of them, so every *pair* of attributes still appears in training and no
# attribute predicts another (holding out pairs would: a model then answers "where" from "what" and
# fails exactly on the held-out pairs). Videos, whose shapes move across quadrants, hold out
# colour-shape pairs.
HELDOUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset(
    (COLOURS[i], SHAPES[(i + j) % 4], POSITIONS[(i + 2 * j) % 4]) for i in range(4) for j in range(2)
)
HELDOUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")}
)


class Phrasings(NamedTuple):
    """Question wordings of one kind: ``train`` ones, and ``heldout`` ones used only in evaluation."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


QUESTIONS: dict[str, Phrasings] = {
    "colour": Phrasings(
        ("What colour is the shape?", "What is the colour of the shape?", "Which colour is the shape?",
         "What colour do you see?"),
        ("Tell me the colour of the shape.", "The shape has which colour?"),
    ),
    "shape": Phrasings(
        ("What shape is it?", "Which shape is shown?", "What shape do you see?", "What kind of shape is this?"),
        ("Name the kind of shape in the picture.", "The picture shows which shape?"),
    ),
    "count": Phrasings(
        ("How many shapes are there?", "How many shapes do you see?", "Count the shapes.",
         "What is the number of shapes?"),
        ("Tell me how many shapes there are.", "How many shapes does the picture have?"),
    ),
    "position": Phrasings(
        ("Where is the shape?", "In which corner is the shape?", "Which corner is the shape in?",
         "Where is the shape in the image?"),
        ("Tell me which corner the shape is in.", "The shape sits in which corner?"),
    ),
    "direction": Phrasings(
        ("Which way does the shape move?", "In which direction does the shape move?",
         "Where is the shape moving?", "Which direction is the shape going?"),
        ("Tell me which way the shape goes.", "The shape travels in which direction?"),
    ),
    "first": Phrasings(
        ("Which colour appeared first?", "What colour was the first shape to appear?",
         "Which shape colour came first?", "What colour showed up first?"),
        ("Tell me the colour that appeared first.", "The first shape to appear had which colour?"),
    ),
    "crossing": Phrasings(
        ("How many shapes crossed the middle?", "How many shapes cross the middle line?",
         "How many shapes moved across the middle?", "Count the shapes that cross the middle."),
        ("Tell me how many shapes crossed the middle.", "The middle line was crossed by how many shapes?"),
    ),
}  # fmt: skip

_SIZE_RANGE = (0.26, 0.36)  # shape side as a fraction of the image side (15-20 px at 56, 7-10 at 28)
_MARGIN = 0.04  # gap kept free inside each quadrant edge, so shapes of neighbouring quadrants never touch
_LANE_SIZE = (0.20, 0.24)  # shapes of the three crossing lanes (a lane is a third of the height)
IMAGE_NOISE = 8  # default per-pixel noise amplitude of images; video frames are plain (H.264-friendly)


# --------------------------------------------------------------------------- scenes and drawing


class PlacedShape(NamedTuple):
    """One shape of a scene: centre ``(x, y)`` and side ``size`` as fractions of the image side."""

    shape: str
    colour: str
    size: float
    x: float
    y: float


@dataclass(frozen=True, kw_only=True)
class ShapeScene:
    """Shapes on a background, independent of resolution (draw with :func:`draw_scene`).

    Attributes:
        shapes: the shapes, drawn in order; plain ``(shape, colour, size, x, y)`` tuples or lists
            are accepted and stored as :class:`PlacedShape`.
        background: RGB of the background.
        noise: amplitude of uniform per-pixel, per-channel noise added over the whole image (0: none).
        noise_seed: seed of that noise, so drawing is deterministic.

    Raises:
        ValueError: an unknown shape or colour, a non-positive size, or a shape not fully inside
            the image.
    """

    shapes: tuple[PlacedShape, ...]
    background: tuple[int, int, int] = BACKGROUND
    noise: int = 0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        shapes = tuple(PlacedShape(*item) for item in self.shapes)
        for i, item in enumerate(shapes):
            if item.shape not in SHAPES:
                raise ValueError(f"shape {i}: unknown shape {item.shape!r}; use one of {SHAPES}")
            if item.colour not in COLOUR_RGB:
                raise ValueError(f"shape {i}: unknown colour {item.colour!r}; use one of {COLOURS}")
            if not 0 < item.size <= 1:
                raise ValueError(f"shape {i}: size must be in (0, 1] of the image side, got {item.size}")
            half = item.size / 2
            if not (half <= item.x <= 1 - half and half <= item.y <= 1 - half):
                raise ValueError(f"shape {i}: {item} is not fully inside the image")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be an RGB triple of 0..255, got {self.background!r}")
        if not 0 <= self.noise <= 127:
            raise ValueError(f"noise must be in [0, 127], got {self.noise}")
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))


def quadrant(x: float, y: float) -> str:
    """The position name (one of :data:`POSITIONS`) of the quadrant holding point ``(x, y)``."""
    return f"{'top' if y < 0.5 else 'bottom'} {'left' if x < 0.5 else 'right'}"


def is_novel(scene: ShapeScene, *, positions: bool = True) -> bool:
    """Whether ``scene`` holds a held-out combination (never seen in training scenes).

    Args:
        scene: the scene to check.
        positions: images (True) hold out colour-shape-quadrant triples (:data:`HELDOUT_TRIPLES`);
            video frames (False),
            whose shapes move between quadrants, hold out colour-shape pairs
            (:data:`HELDOUT_COLOUR_SHAPE`).
    """
    for item in scene.shapes:
        if positions:
            if (item.colour, item.shape, quadrant(item.x, item.y)) in HELDOUT_TRIPLES:
                return True
        elif (item.colour, item.shape) in HELDOUT_COLOUR_SHAPE:
            return True
    return False


def _pixel_box(item: PlacedShape, size: int) -> tuple[int, int, int]:
    """``(left, top, side)`` in pixels of the square that holds ``item``, clamped into the image."""
    side = max(3, round(item.size * size))
    left = min(max(round(item.x * size - side / 2), 0), size - side)
    top = min(max(round(item.y * size - side / 2), 0), size - side)
    return left, top, side


def draw_scene(scene: ShapeScene, size: int = 56) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image.

    A circle fills its square box, a square is the box, a triangle points up with its base on the
    bottom of the box, and a cross is a plus sign whose arms are a third of the box thick: four
    silhouettes that stay distinct down to about 7 px. Every shape is filled with its colour and
    outlined in white (:data:`OUTLINE`, from 12 px shapes up): the outline carries the silhouette in
    the same pixels whatever the fill, which lets a small encoder tell shapes apart independently of
    colour.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"image size must be an int >= 8, got {size!r}")
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for item in scene.shapes:
        fill = COLOUR_RGB[item.colour]
        left, top, side = _pixel_box(item, size)
        right, bottom = left + side - 1, top + side - 1
        width = round(side / 9) if side >= 12 else 0  # below 12 px an outline would hide the fill

        if item.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill, outline=OUTLINE, width=width)
        elif item.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill, outline=OUTLINE, width=width)
        elif item.shape == "triangle":
            points = [(left + (side - 1) / 2, top), (left, bottom), (right, bottom)]
            draw.polygon(points, fill=fill, outline=OUTLINE, width=width)
        else:  # cross: one twelve-sided polygon, so the outline runs round the plus sign only
            arm = max(1, round(side / 3))
            a, b = left + (side - arm) // 2, top + (side - arm) // 2
            c, d = a + arm - 1, b + arm - 1
            points = [
                (a, top),
                (c, top),
                (c, b),
                (right, b),
                (right, d),
                (c, d),
                (c, bottom),
                (a, bottom),
                (a, d),
                (left, d),
                (left, b),
                (a, b),
            ]
            draw.polygon(points, fill=fill, outline=OUTLINE, width=width)
    if scene.noise:
        rng = np.random.default_rng(scene.noise_seed)
        noise = rng.integers(-scene.noise, scene.noise + 1, (size, size, 3), dtype=np.int16)
        pixels = np.asarray(image, dtype=np.int16) + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


# --------------------------------------------------------------------------- image questions


@dataclass(frozen=True, kw_only=True)
class QASample:
    """One image question.

    Attributes:
        image: the RGB image.
        question: the user's question.
        answer: the short answer, one of ``choices``.
        kind: ``"colour"``, ``"shape"``, ``"count"`` or ``"position"``.
        choices: the four possible answers of this kind (:data:`CHOICES`).
        scene: the scene the image was drawn from.
    """

    image: Image.Image
    question: str
    answer: str
    kind: str
    choices: tuple[str, ...]
    scene: ShapeScene


def _rng(what: str, split: str, seed: int) -> random.Random:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and platforms.
    return random.Random(f"mm.synthetic:{what}:{split}:{seed}")


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_kinds(kinds: Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds or any(k not in allowed for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names from {allowed}, got {kinds!r}")
    return kinds


def _plan(rng: random.Random, num_samples: int, kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """(kind, answer) per sample, in shuffled blocks that hold every pair once."""
    plan: list[tuple[str, str]] = []
    while len(plan) < num_samples:
        block = [(kind, answer) for kind in kinds for answer in CHOICES[kind]]
        rng.shuffle(block)
        plan.extend(block)
    return plan[:num_samples]


def _question(rng: random.Random, kind: str, heldout_phrasings: bool) -> str:
    phrasings = QUESTIONS[kind]
    return rng.choice(phrasings.train + phrasings.heldout if heldout_phrasings else phrasings.train)


def _in_quadrant(rng: random.Random, shape: str, colour: str, position: str) -> PlacedShape:
    size = rng.uniform(*_SIZE_RANGE)
    x0 = 0.0 if position.endswith("left") else 0.5
    y0 = 0.0 if position.startswith("top") else 0.5
    lo, hi = size / 2 + _MARGIN, 0.5 - size / 2 - _MARGIN
    return PlacedShape(shape, colour, size, x0 + rng.uniform(lo, hi), y0 + rng.uniform(lo, hi))


def _image_scene(rng: random.Random, kind: str, answer: str, split: str, noise: int) -> ShapeScene:
    want_novel = split == "eval"
    while True:  # rejection: a single shape is novel with probability 7/16
        if kind == "count":
            items = [
                _in_quadrant(rng, rng.choice(SHAPES), rng.choice(COLOURS), position)
                for position in rng.sample(POSITIONS, int(answer))
            ]
            if not want_novel:  # redraw each shape until it is clean, instead of the whole scene
                for i, item in enumerate(items):
                    while is_novel(ShapeScene(shapes=(item,))):
                        item = item._replace(shape=rng.choice(SHAPES), colour=rng.choice(COLOURS))
                    items[i] = item
        else:
            colour = answer if kind == "colour" else rng.choice(COLOURS)
            shape = answer if kind == "shape" else rng.choice(SHAPES)
            position = answer if kind == "position" else rng.choice(POSITIONS)
            items = [_in_quadrant(rng, shape, colour, position)]
        scene = ShapeScene(shapes=tuple(items), noise=noise, noise_seed=rng.getrandbits(63))
        if is_novel(scene) == want_novel:
            return scene


def make_image_qa(
    num_samples: int,
    *,
    split: str,
    seed: int,
    image_size: int = 56,
    kinds: Sequence[str] = IMAGE_KINDS,
    noise: int = IMAGE_NOISE,
    heldout_phrasings: bool = False,
) -> list[QASample]:
    """Questions about generated shapes images, with held-out combinations in ``"eval"``.

    Args:
        num_samples: how many samples.
        split: ``"train"`` (no held-out combination) or ``"eval"`` (every scene holds a held-out
            combination).
        seed: the seed; the same arguments give the same samples.
        image_size: side of the square images in pixels (the demo uses 28 or 56).
        kinds: the question kinds to draw from (:data:`IMAGE_KINDS`), balanced.
        noise: background noise amplitude (0: plain images).
        heldout_phrasings: also ask with the wordings never used in training (``eval`` only; a
            tiny frozen language model does not generalise to new wordings, so the demo leaves
            them out and measures visual generalisation alone).

    Returns:
        ``num_samples`` :class:`QASample` s, balanced over kinds and answers.
    """
    _check_count("num_samples", num_samples)
    kinds = _check_kinds(kinds, IMAGE_KINDS)
    rng = _rng("image", split, seed)
    samples = []
    for kind, answer in _plan(rng, num_samples, kinds):
        scene = _image_scene(rng, kind, answer, split, noise)
        samples.append(
            QASample(
                image=draw_scene(scene, image_size),
                question=_question(rng, kind, heldout_phrasings and split == "eval"),
                answer=answer,
                kind=kind,
                choices=CHOICES[kind],
                scene=scene,
            )
        )
    return samples


def qa_messages(sample: QASample, image_ref: Any = None) -> list[dict[str, Any]]:
    """Llama 3 chat messages of an image question: user [image, question], assistant answer.

    Args:
        sample: the sample.
        image_ref: what the image part holds: a PIL image, or a media field such as ``"0.png"``
            in shards (see :mod:`mm.datasets.shards`); ``sample.image`` when None.
    """
    ref = sample.image if image_ref is None else image_ref
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": ref}, {"type": "text", "text": sample.question}],
        },
        {"role": "assistant", "content": sample.answer},
    ]


def _write_folder(
    samples: Sequence[Any],
    out_dir: str | os.PathLike[str],
    ext: str,
    write: Callable[[Any, Path], Any],
    messages: Callable[[Any, str], list[dict[str, Any]]],
) -> list[str]:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; write samples into a new one")
    keys = [f"{i:06d}" for i in range(len(samples))]
    with atomic_dir(out) as tmp:  # a failure leaves no half-written folder behind
        for key, sample in zip(keys, samples):
            write(sample, tmp / f"{key}.{ext}")
            row = {
                "messages": messages(sample, f"{key}.{ext}"),
                "meta": {"kind": sample.kind, "choices": list(sample.choices)},
            }
            (tmp / f"{key}.json").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return keys


def write_image_qa_folder(samples: Sequence[QASample], out_dir: str | os.PathLike[str]) -> list[str]:
    """Write samples as ``KEY.png`` + ``KEY.json`` for :func:`mm.datasets.shards.pack`.

    ``KEY.json`` is ``{"messages": ..., "meta": {"kind": ..., "choices": [...]}}``, its image part
    naming ``KEY.png``. Keys are ``000000``, ``000001``, ... in order.

    Args:
        samples: the samples to write.
        out_dir: a folder that does not exist yet or is empty.

    Returns:
        The keys written.

    Raises:
        FileExistsError: ``out_dir`` holds files already (they would be packed along).
    """
    return _write_folder(
        samples, out_dir, "png", lambda s, path: s.image.save(path, format="PNG"), qa_messages
    )


# --------------------------------------------------------------------------- video questions


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
    lo, hi = size / 2 + _MARGIN, 1 - size / 2 - _MARGIN
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
    items = [_in_quadrant(rng, s, c, p) for s, c, p in zip(shapes, colours, rng.sample(POSITIONS, count))]
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
        lo, hi = size / 2 + _MARGIN, 0.5 - size / 2 - 0.02  # a body in [lo, hi] stays off the middle
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
    _check_count("num_samples", num_samples)
    if not isinstance(num_frames, int) or num_frames < 8:
        raise ValueError(f"num_frames must be an int >= 8, got {num_frames!r}")
    if not isinstance(size, int) or size < 8 or size % 2:
        raise ValueError(f"size must be an even int >= 8 (H.264 yuv420p), got {size!r}")
    kinds = _check_kinds(kinds, VIDEO_KINDS)
    rng = _rng("video", split, seed)
    samples = []
    for kind, answer in _plan(rng, num_samples, kinds):
        scenes = _VIDEO_SCENES[kind](rng, answer, split, num_frames)
        samples.append(
            VideoQASample(
                frames=[draw_scene(scene, size) for scene in scenes],
                question=_question(rng, kind, heldout_phrasings and split == "eval"),
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
        stream.options = {"crf": str(crf)}
        stream.codec_context.thread_count = 1  # tiny frames: threads cost more than they save
        for array in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_video_qa_folder(
    samples: Sequence[VideoQASample], out_dir: str | os.PathLike[str], *, fps: int = 8
) -> list[str]:
    """Write samples as ``KEY.mp4`` + ``KEY.json`` for :func:`mm.datasets.shards.pack`.

    Like :func:`write_image_qa_folder`, with a video part naming ``KEY.mp4`` (see :func:`write_mp4`).
    """
    return _write_folder(
        samples, out_dir, "mp4", lambda s, path: write_mp4(s.frames, path, fps), video_qa_messages
    )


# --------------------------------------------------------------------------- text corpus


class _T(NamedTuple):
    train: tuple[str, ...]
    heldout: tuple[str, ...]


_TEXT: dict[str, _T] = {
    "intro": _T(
        ("This picture shows {things}.", "Here is a picture with {things}.", "The image has {things} in it."),
        ("Inside the frame we find {things}.",),
    ),
    "place": _T(
        ("There is a {colour} {shape} in the {position} corner.", "A {colour} {shape} is in the {position}.",
         "In the {position} corner there is a {colour} {shape}.", "The {colour} {shape} sits in the {position}."),
        ("You can find a {colour} {shape} at the {position}.", "Over in the {position} is a {colour} {shape}."),
    ),
    "ask colour": _T(("What colour is the {shape}?", "Which colour is the {shape}?"), ("The {shape} has which colour?",)),
    "ask shape": _T(("What shape is the {colour} one?", "Which shape is {colour}?"), ("Name the {colour} shape.",)),
    "ask where": _T(("Where is the {colour} {shape}?", "In which corner is the {colour} {shape}?"),
                    ("Tell me where the {colour} {shape} is.",)),
    "move": _T(
        ("The {colour} {shape} moves {direction}.", "The {colour} {shape} goes {direction}.",
         "Slowly the {colour} {shape} moves {direction}."),
        ("Watch the {colour} {shape} travel {direction}.",),
    ),
    "path": _T(("It starts in the {start} and ends in the {end}.", "It goes from the {start} to the {end}."),
               ("Beginning in the {start}, it finishes in the {end}.",)),
    "appear": _T(
        ("First a {colour} {shape} appears, then a {colour2} {shape2}.",
         "The {colour} {shape} appears before the {colour2} {shape2}."),
        ("Only after the {colour} {shape} does the {colour2} {shape2} show up.",),
    ),
    "cross": _T(("{things} of the three crossed the middle.", "Of three moving shapes, {things} crossed the middle."),
                ("Across the middle line went {things}.",)),
    "shape fact": _T(
        ("A triangle has three sides.", "A square has four sides.", "A circle is round.", "A cross has four arms.",
         "A square has four corners.", "A circle has no corners."),
        ("Every triangle has three corners.", "The arms of a cross meet in the middle."),
    ),
    "colour fact": _T(("{thing} is {colour}.", "The colour of {thing_lower} is {colour}."),
                      ("Everyone knows that {thing_lower} is {colour}.",)),
    "number fact": _T(("{a} plus {b} is {c}.", "After {a} comes {a1}.", "One, two, three, four.", "1, 2, 3, 4."),
                      ("{c} is the sum of {a} and {b}.", "The number before {a1} is {a}.")),
    "story": _T(
        ("{name} has a {colour} {object}.", "{name} walks to the {place}.", "The {animal} sleeps under the {object}.",
         "{name} sees {number} {animal}s in the {place}.", "In the morning {name} plays with the {animal}.",
         "The {object} is on the table.", "{name} gives the {object} to {name2}.", "It is a sunny day in the {place}."),
        ("Later that day {name} lost the {colour} {object}.", "Near the {place}, the {animal} found a {object}."),
    ),
}  # fmt: skip

_THINGS = {"The sky": "blue", "Grass": "green", "The sun": "yellow", "A tomato": "red", "A banana": "yellow",
           "The sea": "blue", "A leaf": "green", "A strawberry": "red", "A lemon": "yellow", "Fire": "red"}  # fmt: skip
_NAMES = ("Anna", "Ben", "Mia", "Tom", "Lena", "Sam", "Omar", "Yuki")
_ANIMALS = ("cat", "dog", "bird", "fish", "horse", "mouse", "duck", "frog")
_OBJECTS = ("ball", "box", "cup", "hat", "kite", "book", "car", "chair")
_PLACES = ("park", "garden", "house", "school", "market", "river")
_STORY_COLOURS = (*COLOURS, "white", "black", "brown", "orange")
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class _Writer:
    """Fills templates; ``mix`` also draws held-out templates (for :func:`heldout_text`)."""

    def __init__(self, rng: random.Random, mix: bool) -> None:
        self.rng, self.mix = rng, mix

    def say(self, group: str, **fields: Any) -> str:
        templates = _TEXT[group].train + (_TEXT[group].heldout if self.mix else ())
        text = self.rng.choice(templates).format(**fields)
        return text[0].upper() + text[1:]

    def question(self, kind: str) -> str:
        phrasings = QUESTIONS[kind]
        return self.rng.choice(phrasings.train + (phrasings.heldout if self.mix else ()))

    def count(self, n: int, noun: str = "shape") -> str:
        number = self.rng.choice((str(n), _NUMBER_WORDS[n]))
        return f"{number} {noun}" + ("" if n == 1 else "s")


def _scene_doc(w: _Writer) -> str:
    rng = w.rng
    count = rng.randint(1, 4)
    items = [(rng.choice(COLOURS), rng.choice(SHAPES), p) for p in rng.sample(POSITIONS, count)]
    lines = [" ".join([w.say("intro", things=w.count(count))] + [
        w.say("place", colour=c, shape=s, position=p) for c, s, p in items
    ])]  # fmt: skip
    qa: list[tuple[str, str]] = [(w.question("count"), str(count))]
    if count == 1:
        colour, shape, position = items[0]
        qa += [
            (w.question("colour"), colour),
            (w.question("shape"), shape),
            (w.question("position"), position),
        ]
    shapes, colours = [s for _, s, _ in items], [c for c, _, _ in items]
    items_pairs = list(zip(colours, shapes))
    for colour, shape, position in items:
        if shapes.count(shape) == 1:
            qa.append((w.say("ask colour", shape=shape), colour))
        if colours.count(colour) == 1:
            qa.append((w.say("ask shape", colour=colour), shape))
        if items_pairs.count((colour, shape)) == 1:
            qa.append((w.say("ask where", colour=colour, shape=shape), position))
    rng.shuffle(qa)
    lines += [f"{q} {a}" for q, a in qa[: rng.randint(1, 3)]]
    return "\n".join(lines)


def _motion_doc(w: _Writer) -> str:
    rng = w.rng
    lines = []
    for part in rng.sample(("direction", "first", "crossing"), rng.randint(1, 3)):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        if part == "direction":
            direction = rng.choice(DIRECTIONS)
            if direction in ("left", "right"):
                row = rng.choice(("top", "bottom"))
                ends = [f"{row} left", f"{row} right"]
            else:
                col = rng.choice(("left", "right"))
                ends = [f"bottom {col}", f"top {col}"]
            if direction in ("left", "down"):
                ends.reverse()
            text = [w.say("move", colour=colour, shape=shape, direction=direction),
                    w.say("path", start=ends[0], end=ends[1])]  # fmt: skip
            answer = direction
        elif part == "first":
            colour2 = rng.choice([c for c in COLOURS if c != colour])
            text = [w.say("appear", colour=colour, shape=shape, colour2=colour2, shape2=rng.choice(SHAPES))]
            answer = colour
        else:
            n = rng.randint(0, 3)
            text = [w.say("cross", things=w.count(n))]
            answer = str(n)
        lines.append(" ".join(text) + f"\n{w.question(part)} {answer}")
    return "\n".join(lines)


def _facts_doc(w: _Writer) -> str:
    rng = w.rng
    sentences = []
    for _ in range(rng.randint(3, 6)):
        group = rng.choice(("shape fact", "colour fact", "number fact"))
        thing = rng.choice(sorted(_THINGS))
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        fields = {"thing": thing, "thing_lower": thing[0].lower() + thing[1:], "colour": _THINGS[thing],
                  "a": a, "b": b, "c": a + b, "a1": a + 1}  # fmt: skip
        sentences.append(w.say(group, **fields))
    return " ".join(sentences)


def _story_doc(w: _Writer) -> str:
    rng = w.rng
    name, name2 = rng.sample(_NAMES, 2)
    sentences = []
    for _ in range(rng.randint(3, 6)):
        fields = {"name": name, "name2": name2, "colour": rng.choice(_STORY_COLOURS), "object": rng.choice(_OBJECTS),
                  "place": rng.choice(_PLACES), "animal": rng.choice(_ANIMALS), "number": rng.choice(_NUMBER_WORDS[2:5])}  # fmt: skip
        sentences.append(w.say("story", **fields))
    return " ".join(sentences)


_DOCS = ((_scene_doc, 0.35), (_motion_doc, 0.25), (_facts_doc, 0.15), (_story_doc, 0.25))


def _documents(num_docs: int, rng: random.Random, mix: bool) -> list[str]:
    _check_count("num_docs", num_docs)
    writer = _Writer(rng, mix)
    makers, weights = zip(*_DOCS)
    # Two or three paragraphs per document: long enough that documents practically never repeat.
    return [
        "\n\n".join(maker(writer) for maker in rng.choices(makers, weights, k=rng.randint(2, 3)))
        for _ in range(num_docs)
    ]


def make_text_corpus(num_docs: int, *, seed: int) -> list[str]:
    """Short English documents for natively pre-training the tiny backbone (a base language model).

    Documents describe shapes scenes, moving shapes, simple facts and little stories, using the
    vocabulary of the image and video questions, and include question lines answered exactly as
    the questions are (``"What colour is the shape? red"``), so the model knows the words and what
    answers look like. Only the training templates and phrasings are used.

    Args:
        num_docs: how many documents (each two or three paragraphs, about 150-900 characters).
        seed: the seed; the same arguments give the same documents.
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return _documents(num_docs, random.Random(f"mm.synthetic:text:train:{seed}"), mix=False)


def heldout_text(num_docs: int, seed: int) -> list[str]:
    """Documents for held-out perplexity: another random stream than :func:`make_text_corpus` for
    any seed, with held-out templates and question phrasings mixed into the training ones."""
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return _documents(num_docs, random.Random(f"mm.synthetic:text:heldout:{seed}"), mix=True)
