"""The shapes world of ``mm demo``: its vocabulary, scenes of shapes, and drawing them.

Every question the demo asks, of an image, a clip or a text document, is about this world.

**Vocabulary.** Four colours (:data:`COLOURS`), four shapes (:data:`SHAPES`), four positions
(:data:`POSITIONS`, the quadrants) and the counts 1-4. Every question kind has exactly four
answers (:data:`CHOICES`), so chance is 0.25 per kind. Colours are saturated and far apart, the
background is dark, shapes are large (26-36 % of the image side: 15-20 px at 56 px), never overlap
and lie fully inside their quadrant, so a tiny ViT can learn the tasks in a few hundred steps.

**Scenes.** A :class:`ShapeScene` holds :class:`PlacedShape` s whose centre and size are
*fractions of the image side*, so one scene renders at any resolution with :func:`draw_scene`.

**Held-out combinations.** Images hold out colour-shape-quadrant triples (:data:`HELDOUT_TRIPLES`),
videos and speech colour-shape pairs (:data:`HELDOUT_COLOUR_SHAPE`); :func:`is_novel` tells whether
a scene holds one. Question wordings come in ``train`` and ``heldout`` :class:`Phrasings`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "CHOICES",
    "COLOURS",
    "COLOUR_RGB",
    "COUNTS",
    "CROSSINGS",
    "DIRECTIONS",
    "HELDOUT_COLOUR_SHAPE",
    "HELDOUT_TRIPLES",
    "IMAGE_KINDS",
    "MARGIN",
    "OUTLINE",
    "POSITIONS",
    "Phrasings",
    "PlacedShape",
    "QUESTIONS",
    "SHAPES",
    "ShapeScene",
    "VIDEO_KINDS",
    "caption",
    "draw_scene",
    "is_novel",
    "place_in_quadrant",
    "quadrant",
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

SIZE_RANGE = (0.26, 0.36)  # shape side as a fraction of the image side (15-20 px at 56, 7-10 at 28)
MARGIN = 0.04  # gap kept free inside each quadrant edge, so shapes of neighbouring quadrants never touch


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


def place_in_quadrant(rng: random.Random, shape: str, colour: str, position: str) -> PlacedShape:
    """A shape of random size (:data:`SIZE_RANGE`) at a random place fully inside the quadrant
    ``position``, :data:`MARGIN` away from its edges."""
    size = rng.uniform(*SIZE_RANGE)
    x0 = 0.0 if position.endswith("left") else 0.5
    y0 = 0.0 if position.startswith("top") else 0.5
    lo, hi = size / 2 + MARGIN, 0.5 - size / 2 - MARGIN
    return PlacedShape(shape, colour, size, x0 + rng.uniform(lo, hi), y0 + rng.uniform(lo, hi))


def caption(scene) -> str:
    """A plain-English description of a generated scene: what and where for a lone shape, how many
    (and of which colours) for several."""
    shapes = scene.shapes
    if len(shapes) == 1:
        s = shapes[0]
        return f"A {s.colour} {s.shape} in the {quadrant(s.x, s.y)}."
    words = {2: "Two", 3: "Three", 4: "Four"}
    return f"{words[len(shapes)]} shapes."
