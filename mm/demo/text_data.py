"""The text corpus of ``mm demo``: short English documents the tiny backbone is pre-trained on.

Documents describe shapes scenes, moving shapes, simple facts (:data:`COLOUR_FACTS`) and little
stories, in the vocabulary of the image and video questions, and hold question lines answered
exactly as those questions are. Templates come in ``train`` and ``heldout`` wordings:
:func:`make_text_corpus` uses only the training ones, :func:`heldout_text` (held-out perplexity)
mixes in the others.
"""

from __future__ import annotations

import random
from typing import Any

from mm.demo._sampling import check_count
from mm.demo.scenes import COLOURS, DIRECTIONS, POSITIONS, QUESTIONS, SHAPES
from mm.demo.scenes import Phrasings as _T

__all__ = ["COLOUR_FACTS", "heldout_text", "make_text_corpus"]

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
COLOUR_FACTS: dict[str, str] = {thing[0].lower() + thing[1:]: colour for thing, colour in _THINGS.items()}
"""Things and their colours, as the corpus states them ("The sky is blue."), keyed as they read
mid-sentence ("the sky")."""
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
    check_count("num_docs", num_docs)
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
