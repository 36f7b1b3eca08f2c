"""mm's sample schema, shared by the shard writer and readers (documented in :mod:`mm.datasets.shards`).

The extensions of each media kind, the key / field split of member names, Llama 3 chat messages
with media parts, and the errors for samples that do not follow them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from mm.text_backbone.chat_format import ROLES

__all__ = [
    "AUDIO_EXTENSIONS",
    "DEFAULT_CAPTION_PROMPTS",
    "FEATURES_EXTENSION",
    "IMAGE_EXTENSIONS",
    "MEDIA_KINDS",
    "PICKLE_EXTENSIONS",
    "PREFERENCE_ANSWERS",
    "TEXT_FIELDS",
    "PackError",
    "SampleError",
    "VIDEO_EXTENSIONS",
    "caption_messages",
    "check_messages",
    "check_preference",
    "is_preference",
    "is_features",
    "media_kind",
    "rewrite_media",
    "split_member_name",
]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mkv", "mov"})
AUDIO_EXTENSIONS = frozenset({"flac", "wav", "mp3", "ogg"})
MEDIA_KINDS: Mapping[str, frozenset[str]] = {
    "image": IMAGE_EXTENSIONS,
    "video": VIDEO_EXTENSIONS,
    "audio": AUDIO_EXTENSIONS,
}
# Cached encoder outputs of a video (``0.mp4.safetensors``): tensors and a JSON header, no code.
FEATURES_EXTENSION = "safetensors"
# Members that hold pickles (webdataset's default decoder would unpickle them): never decoded.
PICKLE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pt", "pth"})
TEXT_FIELDS = frozenset({"json", "txt"})
DEFAULT_CAPTION_PROMPTS: Mapping[str, str] = {
    "image": "Describe the image.",
    "video": "Describe the video.",
    "audio": "Transcribe the audio.",
}
#: The ranked answers of a preference sample, best first (Llama 3 section 7.5.1: edited > chosen >
#: rejected); ``edited`` is optional.
PREFERENCE_ANSWERS = ("edited", "chosen", "rejected")
_NAME_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / field split


class SampleError(ValueError):
    """A sample that does not follow mm's schema. ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class PackError(ValueError):
    """Input that :func:`~mm.datasets.shards.pack` refuses; the message names the file or manifest line."""


# Public under mm.datasets.shards, where they have always been (and where tracebacks should say).
SampleError.__module__ = PackError.__module__ = "mm.datasets.shards"


# --------------------------------------------------------------------------- schema helpers


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """Split a tar member name into (key, field) as webdataset does: the field follows the first dot.

    Returns ``(None, None)`` for names without a dot in their base name.
    """
    match = _NAME_RE.match(name)
    if match is None:
        return None, None
    return match.group(1), match.group(2)


def media_kind(name: str) -> str | None:
    """``"image"`` / ``"video"`` / ``"audio"`` from the last extension of ``name``, else None.

    A features member ``X.EXT.safetensors`` (see :func:`is_features`) has the kind of ``X.EXT``
    when that is a video; cached features exist for videos only.
    """
    stem, _, ext = name.lower().rpartition(".")
    if ext == FEATURES_EXTENSION:
        return "video" if stem.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS else None
    for kind, exts in MEDIA_KINDS.items():
        if ext in exts:
            return kind
    return None


def is_features(name: str) -> bool:
    """Whether ``name`` is a features member (cached frame tokens of a video), not the medium itself."""
    return name.lower().rsplit(".", 1)[-1] == FEATURES_EXTENSION and media_kind(name) is not None


def check_messages(messages: Any) -> list[tuple[str, str]]:
    """Validate Llama 3 chat messages and return their media references in order.

    Args:
        messages: the list to check.

    Returns:
        ``[(kind, value), ...]`` for every media part, in order of appearance.

    Raises:
        SampleError: reason ``"bad messages"`` with a message naming the message / part at fault.
    """
    if not isinstance(messages, list) or not messages:
        raise SampleError("bad messages", "'messages' must be a non-empty list")
    refs: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise SampleError("bad messages", f"message {i} is a {type(message).__name__}, not an object")
        if message.get("role") not in ROLES:
            raise SampleError(
                "bad messages", f"message {i} has role {message.get('role')!r}, not one of {ROLES}"
            )
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise SampleError("bad messages", f"message {i}: content must be a string or a list of parts")
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise SampleError("bad messages", f"message {i}, part {k}: 'text' must be a string")
            elif kind in MEDIA_KINDS:
                if not isinstance(part.get(kind), str) or not part[kind]:
                    raise SampleError(
                        "bad messages",
                        f"message {i}, part {k}: a {kind} part needs a non-empty string {kind!r}",
                    )
                refs.append((kind, part[kind]))
            else:
                raise SampleError(
                    "bad messages",
                    f"message {i}, part {k}: part type {kind!r} is not one of 'text', {', '.join(MEDIA_KINDS)}",
                )
    return refs


def caption_messages(kind: str, field: str, caption: str, prompt: str) -> list[dict[str, Any]]:
    """The messages of a caption pair: user [media, prompt], assistant caption."""
    return [
        {"role": "user", "content": [{"type": kind, kind: field}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": caption},
    ]


def rewrite_media(messages: list[dict[str, Any]], mapping: Mapping[str, str]) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose media part values are replaced through ``mapping``."""
    out = copy.deepcopy(messages)
    for message in out:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] in MEDIA_KINDS:
                    part[part["type"]] = mapping[part[part["type"]]]
    return out


def is_preference(sample: Mapping[str, Any]) -> bool:
    """Whether a sample's JSON is a preference sample (it has ranked answers)."""
    return any(answer in sample for answer in PREFERENCE_ANSWERS)


def check_preference(sample: Mapping[str, Any]) -> dict[str, str]:
    """Validate the answers of a preference sample whose ``messages`` passed :func:`check_messages`.

    The prompt must end with a user turn; ``chosen`` and ``rejected`` are required, ``edited``
    optional; each answer is a string that is not blank, and no two are equal.

    Returns:
        ``{"chosen": ..., "rejected": ..., ["edited": ...]}``.

    Raises:
        SampleError: reason ``"bad preference"`` naming the answer or turn at fault.
    """
    last = sample["messages"][-1]
    if last.get("role") != "user":
        raise SampleError(
            "bad preference",
            f"the prompt of a preference sample must end with a user turn, not {last.get('role')!r}",
        )
    answers: dict[str, str] = {}
    for name in ("chosen", "rejected", "edited"):
        if name not in sample:
            if name != "edited":
                raise SampleError("bad preference", f"a preference sample needs {name!r}")
            continue
        value = sample[name]
        if not isinstance(value, str) or not value.strip():
            raise SampleError("bad preference", f"{name!r} must be a non-empty string")
        answers[name] = value
    names = list(answers)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if answers[a] == answers[b]:
                raise SampleError("bad preference", f"{a!r} and {b!r} are the same answer")
    return answers
