"""Image questions of ``mm demo``: generated pictures of shapes and a question about each.

``colour``, ``shape`` and ``position`` ask about the one shape of a single-shape scene; ``count``
asks how many shapes (1-4, one per quadrant) a scene has (:data:`~mm.demo.scenes.IMAGE_KINDS`).
Training images never contain a colour-shape-quadrant triple of
:data:`~mm.demo.scenes.HELDOUT_TRIPLES` (e.g. a red circle in the top left, although red circles,
red shapes in the top left and circles in the top left all appear); every evaluation image contains
one, so evaluation measures generalisation, not memorisation. Answers are drawn in shuffled blocks
holding every (kind, answer) once, so any run of samples is balanced over kinds and answers up to
one unfinished block.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mm.demo._sampling import check_count, check_kinds, pick_question, plan_answers, sample_rng, write_folder
from mm.demo.scenes import (
    CHOICES,
    COLOURS,
    IMAGE_KINDS,
    POSITIONS,
    SHAPES,
    ShapeScene,
    draw_scene,
    is_novel,
    place_in_quadrant,
)

__all__ = ["IMAGE_NOISE", "QASample", "make_image_qa", "qa_messages", "write_image_qa_folder"]

IMAGE_NOISE = 8  # default per-pixel noise amplitude of images; video frames are plain (H.264-friendly)


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


def _image_scene(rng: random.Random, kind: str, answer: str, split: str, noise: int) -> ShapeScene:
    want_novel = split == "eval"
    while True:  # rejection: a single shape is novel with probability 7/16
        if kind == "count":
            items = [
                place_in_quadrant(rng, rng.choice(SHAPES), rng.choice(COLOURS), position)
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
            items = [place_in_quadrant(rng, shape, colour, position)]
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
    check_count("num_samples", num_samples)
    kinds = check_kinds(kinds, IMAGE_KINDS)
    rng = sample_rng("image", split, seed)
    samples = []
    for kind, answer in plan_answers(rng, num_samples, kinds):
        scene = _image_scene(rng, kind, answer, split, noise)
        samples.append(
            QASample(
                image=draw_scene(scene, image_size),
                question=pick_question(rng, kind, heldout_phrasings and split == "eval"),
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
    return write_folder(
        samples, out_dir, "png", lambda s, path: s.image.save(path, format="PNG"), qa_messages
    )
