"""The Llama 3 chat format, with media placeholders and the mask of what the assistant said.

A dialog is laid out as ("The Llama 3 Herd of Models", section 4.1.1)::

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     (each message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                      (generation prompt)

The ids equal those of Meta's reference (``llama-models``: ``ChatFormat.encode_dialog_prompt``, whose
``<|image|>`` is rewritten to 128256 before the model, the id mm emits) for every role Meta has:
``system``, ``user``, ``assistant`` and ``tool``, whose header Meta writes ``ipython``; mm also
takes ``ipython`` itself as a role name, with the same header. An assistant message with
``"eom": True`` ends with ``<|eom_id|>`` instead of ``<|eot_id|>`` (Meta's ``stop_reason ==
end_of_message``: the model stops to let a tool run and expects to continue the same turn).
Tool calls (Meta's ``tool_calls``, written after ``<|python_tag|>``) and Meta's RAG ``context`` are
not laid out here: a message carrying either is refused rather than silently shortened.

Role names, ``"\\n\\n"`` and every text part are encoded on their own, as Meta's reference chat
format does, and always with ``allow_special=False``: a user who types ``<|eot_id|>`` gets the
characters, never the token (``disallowed_special`` makes it an error instead). An ``{"type":
"image"}`` part (also ``video`` / ``audio``) emits exactly one placeholder id; the media themselves
travel beside the tokens (sections 7 and 8).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mm.text_backbone.tokenizer import SpecialTokenError, Tokenizer

__all__ = ["IGNORE_INDEX", "ROLES", "ChatTokens", "format_chat", "labels_from"]

ROLES = ("system", "user", "assistant", "tool", "ipython")
_HEADER_NAMES = {"tool": "ipython"}
"""Roles whose header spells another name (Meta: ``Role.tool`` is written ``ipython``)."""
MEDIA_TYPES = ("image", "video", "audio")
IGNORE_INDEX = -100
"""Label of positions that carry no loss (Hugging Face / PyTorch cross-entropy convention)."""


@dataclass(kw_only=True)
class ChatTokens:
    """A formatted dialog.

    Attributes:
        ids: token ids ``[s]``.
        assistant_mask: ``[s]``, True on the tokens of assistant message contents including their
            closing ``<|eot_id|>`` or ``<|eom_id|>``; False on bos, headers, the generation prompt,
            placeholders and every other role's message.
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
    disallowed_special: str | Collection[str] = (),
) -> ChatTokens:
    """Lay out ``messages`` in the Llama 3 chat format.

    Args:
        tokenizer: any mm :class:`~mm.text_backbone.tokenizer.Tokenizer`.
        messages: dicts ``{"role": "system" | "user" | "assistant" | "tool" | "ipython", "content":
            str | list}``, an assistant message optionally with ``"eom": True`` (end with
            ``<|eom_id|>``); a list holds parts ``{"type": "text", "text": str}`` or ``{"type":
            "image" | "video" | "audio"}`` (other keys of a part, such as the image itself, are
            ignored here). Text is used as given (not stripped).
        add_generation_prompt: end with an open assistant header for the model to continue.
        bos: start with ``<|begin_of_text|>``.
        disallowed_special: special-token strings that make a text part an error instead of
            ordinary characters, as in :meth:`Tokenizer.encode` (``"all"`` or a collection of names);
            the default ``()`` encodes them as characters, as Meta's chat format does.

    Returns:
        The ids, the assistant mask and the media kinds.

    Raises:
        SpecialTokenError: (a ``ValueError``) a text part holds a disallowed special token; the
            message names the message index, the part and the token.
        ValueError: an unknown role or part type, content / text that is not a string, ``eom`` on
            a message that is not the assistant's or not a bool, tool calls or a RAG context.
    """
    tokenizer.encode("", disallowed_special=disallowed_special)  # a bad argument fails even without text
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
        eom = _end_of_message(message, index, role)
        chat._add(_header(tokenizer, _HEADER_NAMES.get(role, role)), False)
        trained = role == "assistant"
        for k, part in enumerate(_parts(message["content"], index)):
            kind = part["type"]
            if kind == "text":
                chat._add(_encode_part(tokenizer, part["text"], disallowed_special, index, k), trained)
            else:
                chat._add([tokenizer.special_id(f"<|{kind}|>")], False)
                chat.media.append(kind)
        chat._add([tokenizer.eom_id if eom else tokenizer.eot_id], trained)
    if add_generation_prompt:
        chat._add(_header(tokenizer, "assistant"), False)
    return chat


def labels_from(chat: ChatTokens) -> list[int]:
    """Training labels for ``chat`` in the Hugging Face convention.

    ``labels[i] = chat.ids[i]`` where ``chat.assistant_mask[i]`` and ``-100`` elsewhere. The labels
    are aligned with the *inputs*, not shifted: the model shifts them internally, so the logits at
    position ``i`` are scored against ``labels[i + 1]``. Only what the assistant said (and its
    closing ``<|eot_id|>`` or ``<|eom_id|>``, so the model learns to stop) is learned; system, user,
    tool and ipython messages are context only.
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


def _end_of_message(message: Mapping[str, Any], index: int, role: str) -> bool:
    """Whether the message ends with ``<|eom_id|>``; refuses what Meta would lay out but mm cannot."""
    eom = message.get("eom", False)
    if not isinstance(eom, bool):
        raise ValueError(f"message {index} ({role}): 'eom' must be a bool, got {type(eom).__name__}")
    if eom and role != "assistant":
        raise ValueError(f"message {index} ({role}): only an assistant message can end with <|eom_id|>")
    if message.get("tool_calls"):
        raise ValueError(
            f"message {index} ({role}): tool calls are not laid out by format_chat; "
            "put the call's text in the content"
        )
    if message.get("context") is not None:
        raise ValueError(f"message {index} ({role}): a RAG 'context' is not laid out by format_chat")
    return eom


def _encode_part(
    tokenizer: Tokenizer, text: str, disallowed_special: str | Collection[str], index: int, part: int
) -> list[int]:
    try:
        return tokenizer.encode(text, disallowed_special=disallowed_special)
    except SpecialTokenError as err:
        raise SpecialTokenError(
            f"message {index}, part {part}: the text holds the special token {err.token!r} at "
            f"character {err.position}, which disallowed_special refuses",
            token=err.token,
            position=err.position,
        ) from None


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
