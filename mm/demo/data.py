"""Generated data for ``mm demo``: pictures and clips of shapes, a text corpus, and speech.

The demo reproduces the compositional recipe of "The Llama 3 Herd of Models" (2024) in miniature
and offline: a tiny text backbone is pre-trained natively on :func:`make_text_corpus` (section 3),
frozen, and then image adapters (sections 7.1-7.4), video adapters (section 7.2, "video adapter")
and speech adapters (section 8) learn to answer questions about :func:`make_image_qa` pictures,
:func:`make_video_qa` clips and :func:`make_speech_samples` utterances. Nothing is downloaded;
everything is drawn deterministically from a seed (every generator uses its own
``random.Random`` / ``numpy.random.Generator``, never the global ones, and the split name is mixed
into the seed, so train and eval never share a random stream).

Everything is about one small world (:mod:`mm.demo.scenes`): four colours, four shapes, four
quadrants, and questions with exactly four possible answers each. Evaluation samples always hold a
combination never seen in training (a colour-shape-quadrant triple for pictures, a colour-shape
pair for clips and speech), so evaluation measures generalisation, not memorisation; answers are
drawn in shuffled blocks, so any run of samples is balanced over them.

This module gathers the generators' public names; they live in :mod:`mm.demo.scenes` (vocabulary,
scenes, drawing), :mod:`mm.demo.image_data`, :mod:`mm.demo.video_data`, :mod:`mm.demo.text_data`
and :mod:`mm.demo.speech_data`.
"""

from __future__ import annotations

from mm.demo.image_data import IMAGE_NOISE, QASample, make_image_qa, qa_messages, write_image_qa_folder
from mm.demo.scenes import (
    BACKGROUND,
    CHOICES,
    COLOUR_RGB,
    COLOURS,
    COUNTS,
    CROSSINGS,
    DIRECTIONS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_TRIPLES,
    IMAGE_KINDS,
    OUTLINE,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    VIDEO_KINDS,
    Phrasings,
    PlacedShape,
    ShapeScene,
    draw_scene,
    is_novel,
    quadrant,
)
from mm.demo.speech_data import (
    ASR_PROMPT,
    ASR_TEMPLATES,
    AST_PROMPT,
    FRENCH_TEMPLATES,
    QA_TEMPLATES,
    TASK_PROMPTS,
    SpeechSample,
    make_speech_samples,
    speech_messages,
    synthesize,
    to_french,
    write_speech_folder,
)
from mm.demo.text_data import COLOUR_FACTS, heldout_text, make_text_corpus
from mm.demo.video_data import (
    VideoQASample,
    make_video_qa,
    video_qa_messages,
    write_mp4,
    write_video_qa_folder,
)

__all__ = [
    "ASR_PROMPT",
    "ASR_TEMPLATES",
    "AST_PROMPT",
    "BACKGROUND",
    "CHOICES",
    "COLOURS",
    "COLOUR_FACTS",
    "COLOUR_RGB",
    "COUNTS",
    "CROSSINGS",
    "DIRECTIONS",
    "FRENCH_TEMPLATES",
    "HELDOUT_COLOUR_SHAPE",
    "HELDOUT_TRIPLES",
    "IMAGE_KINDS",
    "IMAGE_NOISE",
    "OUTLINE",
    "POSITIONS",
    "QA_TEMPLATES",
    "QUESTIONS",
    "SHAPES",
    "TASK_PROMPTS",
    "VIDEO_KINDS",
    "Phrasings",
    "PlacedShape",
    "QASample",
    "ShapeScene",
    "SpeechSample",
    "VideoQASample",
    "draw_scene",
    "heldout_text",
    "is_novel",
    "make_image_qa",
    "make_speech_samples",
    "make_text_corpus",
    "make_video_qa",
    "qa_messages",
    "quadrant",
    "speech_messages",
    "synthesize",
    "to_french",
    "video_qa_messages",
    "write_image_qa_folder",
    "write_mp4",
    "write_speech_folder",
    "write_video_qa_folder",
]
