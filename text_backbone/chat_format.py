"""The Llama 3 chat format, with media placeholders and the mask of what the assistant said.

A dialog is laid out as ("The Llama 3 Herd of Models", section 4.1.1)::

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     (each message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                      (generation prompt)

Role names, ``"\\n\\n"`` and every text part are encoded on their own, as Meta's reference chat
format does, and always with ``allow_special=False``: a user who types ``<|eot_id|>`` gets the
characters, never the token. An ``{"type": "image"}`` part (also ``video`` / ``audio``) emits exactly
one placeholder id; the media themselves travel beside the tokens (sections 7 and 8).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mm.text_backbone.tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "ROLES", "ChatTokens", "format_chat", "labels_from"]

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "video", "audio")
IGNORE_INDEX = -100
"""Label of positions that carry no loss (Hugging Face / PyTorch cross-entropy convention)."""


@dataclass(kw_only=True)
class ChatTokens:
    """A formatted dialog.

    Attributes:
        ids: token ids ``[s]``.
        assistant_mask: ``[s]``, True on the tokens of assistant message contents including their
            closing ``<|eot_id|>``; False on bos, headers, the generation prompt and placeholders.
        media: kinds of the placeholders in order of appearance, e.g. ``["image", "image"]``.
    """

    ids: list[int] = field(default_factory=list)
    assistant_mask: list[bool] = field(default_factory=list)
    media: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def _add(self, ids: Iterable[int], trained: bool) -> None:
        ids = list(ids)
        self.ids.extend(ids)
        self.assistant_mask.extend([trained] * len(ids))


def format_chat(
    tokenizer: Tokenizer,
    messages: Iterable[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos: bool = True,
) -> ChatTokens:
    """Lay out ``messages`` in the Llama 3 chat format.

    Args:
        tokenizer: any mm :class:`~mm.text_backbone.tokenizer.Tokenizer`.
        messages: dicts ``{"role": "system" | "user" | "assistant", "content": str | list}``; a
            list holds parts ``{"type": "text", "text": str}`` or ``{"type": "image" | "video" |
            "audio"}`` (other keys of a part, such as the image itself, are ignored here). Text is
            used as given (not stripped).
        add_generation_prompt: end with an open assistant header for the model to continue.
        bos: start with ``<|begin_of_text|>``.

    Returns:
        The ids, the assistant mask and the media kinds.

    Raises:
        ValueError: an unknown role or part type, or content / text that is not a string.
    """
    chat = ChatTokens()
    if bos:
        chat._add([tokenizer.bos_id], False)
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} is a {type(message).__name__}, not a dict")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index} has unknown role {role!r}; expected one of {ROLES}")
        if "content" not in message:
            raise ValueError(f"message {index} ({role}) has no 'content'")
        chat._add(_header(tokenizer, role), False)
        trained = role == "assistant"
        for part in _parts(message["content"], index):
            kind = part["type"]
            if kind == "text":
                chat._add(tokenizer.encode(part["text"]), trained)
            else:
                chat._add([tokenizer.special_id(f"<|{kind}|>")], False)
                chat.media.append(kind)
        chat._add([tokenizer.eot_id], trained)
    if add_generation_prompt:
        chat._add(_header(tokenizer, "assistant"), False)
    return chat


def labels_from(chat: ChatTokens) -> list[int]:
    """Training labels for ``chat`` in the Hugging Face convention.

    ``labels[i] = chat.ids[i]`` where ``chat.assistant_mask[i]`` and ``-100`` elsewhere. The labels
    are aligned with the *inputs*, not shifted: the model shifts them internally, so the logits at
    position ``i`` are scored against ``labels[i + 1]``. Only what the assistant said (and its
    closing ``<|eot_id|>``, so the model learns to stop) is learned.
    """
    if len(chat.ids) != len(chat.assistant_mask):
        raise ValueError(f"{len(chat.ids)} ids but {len(chat.assistant_mask)} mask entries")
    return [t if keep else IGNORE_INDEX for t, keep in zip(chat.ids, chat.assistant_mask)]


def _header(tokenizer: Tokenizer, role: str) -> list[int]:
    return [
        tokenizer.start_header_id,
        *tokenizer.encode(role),
        tokenizer.end_header_id,
        *tokenizer.encode("\n\n"),
    ]


def _parts(content: Any, index: int) -> list[Mapping[str, Any]]:
    """Normalise ``content`` to a list of validated parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list | tuple):
        raise ValueError(
            f"message {index}: content must be a str or a list of parts, got {type(content).__name__}"
        )
    for k, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ValueError(f"message {index}, part {k}: a part must be a dict, got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(
                    f"message {index}, part {k}: text must be a str, got {type(part.get('text')).__name__}"
                )
        elif kind not in MEDIA_TYPES:
            raise ValueError(
                f"message {index}, part {k}: unknown part type {kind!r}; expected 'text' or one of "
                f"{MEDIA_TYPES}"
            )
    return list(content)
