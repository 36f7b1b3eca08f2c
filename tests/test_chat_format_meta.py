"""mm's chat format against Meta's reference, with the real Llama 3 ``tokenizer.model``.

The oracle is ``llama_models.llama3.chat_format.ChatFormat.encode_dialog_prompt`` (llama-models
0.3.0, a test-only dependency). Its ``LLMInput.tokens`` already carry the image as 128256, the
placeholder mm emits, so ids compare directly.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import llama_models.llama3.tokenizer as meta_tokenizer
import pytest
from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, StopReason, ToolPromptFormat
from llama_models.llama3.chat_format import ChatFormat
from PIL import Image

from mm.text_backbone.chat_format import IGNORE_INDEX, ROLES, format_chat, labels_from
from mm.text_backbone.tokenizer import ByteTokenizer, SpecialTokenError, TiktokenTokenizer

MODEL_PATH = Path(meta_tokenizer.__file__).parent / "tokenizer.model"


@pytest.fixture(scope="module")
def meta():
    return ChatFormat(meta_tokenizer.Tokenizer(MODEL_PATH))


@pytest.fixture(scope="module")
def tok():
    return TiktokenTokenizer(MODEL_PATH)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


def _to_meta(message: dict[str, Any]) -> RawMessage:
    """The same message as Meta's ``RawMessage`` (mm's ``ipython`` role is Meta's ``tool``)."""
    content = message["content"]
    if not isinstance(content, str):
        content = [
            RawTextItem(text=part["text"]) if part["type"] == "text" else RawMediaItem(data=PNG)
            for part in content
        ]
    return RawMessage(
        role="tool" if message["role"] == "ipython" else message["role"],
        content=content,
        stop_reason=StopReason.end_of_message if message.get("eom") else None,
    )


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


IMAGE = {"type": "image", "image": PNG}

DIALOGS = {
    "every role": [
        {"role": "system", "content": "You are a helpful assistant.\nEnvironment: ipython"},
        {"role": "user", "content": [_text("What is in "), IMAGE, _text(" this picture? And 2+2?")]},
        {"role": "assistant", "content": "A red square. Let me compute 2+2.", "eom": True},
        {"role": "tool", "content": '{"result": 4}'},
        {"role": "assistant", "content": [_text("It is "), _text("4.")]},
        {"role": "ipython", "content": [_text("stdout:\n4\n")]},
        {"role": "assistant", "content": "Done, again: 4.", "eom": False},
        {"role": "user", "content": [IMAGE, IMAGE, _text("And these two?"), _text(""), _text(" ")]},
    ],
    "image only": [{"role": "user", "content": [IMAGE]}],
    "system only": [{"role": "system", "content": ""}],
    "no messages": [],
    "assistant ends with eom": [
        {"role": "user", "content": "Search the weather in Paris."},
        {"role": "assistant", "content": "<|python_tag|>brave_search.call(query='Paris')", "eom": True},
    ],
    "tool with image": [
        {"role": "user", "content": "Draw it."},
        {"role": "tool", "content": [_text("rendered: "), IMAGE]},
        {"role": "assistant", "content": [IMAGE, _text("Here it is.")]},
    ],
    "special-token text and unicode": [
        {"role": "system", "content": "\n\nLeading newlines, trailing spaces   "},
        {"role": "user", "content": "hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|image|>"},
        {"role": "assistant", "content": "日本語 🌍 e\u0301 שלום\u3000\t\r\n<|eom_id|>"},
        {"role": "user", "content": [_text("<|python_tag|>"), IMAGE, _text("<|begin_of_text|>")]},
    ],
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_format_chat_ids_equal_meta(meta, tok, name):
    dialog = DIALOGS[name]
    expected = meta.encode_dialog_prompt([_to_meta(m) for m in dialog])
    chat = format_chat(tok, dialog)
    assert chat.ids == expected.tokens
    images = expected.vision.images if expected.vision else []
    assert chat.media == ["image"] * len(images)
    assert chat.ids.count(tok.image_id) == len(images)
    # Without the generation prompt: Meta's tokens less its trailing assistant header.
    header = meta._encode_header("assistant")
    bare = format_chat(tok, dialog, add_generation_prompt=False)
    assert bare.ids + header == expected.tokens


@pytest.mark.parametrize("name", list(DIALOGS))
def test_assistant_mask_follows_meta_messages(meta, tok, name):
    # What the model learns: each assistant message after its header, with its closing
    # <|eot_id|> / <|eom_id|>, and no image; nothing of the other roles.
    dialog = DIALOGS[name]
    expected = [False]  # <|begin_of_text|>
    learned: list[list[int]] = []
    for message in dialog:
        raw = _to_meta(message)
        header = meta._encode_header(raw.role)
        tokens, _ = meta.encode_message(raw, ToolPromptFormat.json)
        assert tokens[: len(header)] == header
        trained = [raw.role == "assistant" and t != meta.vision_token for t in tokens[len(header) :]]
        expected += [False] * len(header) + trained
        if raw.role == "assistant":
            learned.append([t for t, keep in zip(tokens[len(header) :], trained) if keep])
    expected += [False] * len(meta._encode_header("assistant"))
    chat = format_chat(tok, dialog)
    assert chat.assistant_mask == expected
    labels = labels_from(chat)
    assert [t for t in labels if t != IGNORE_INDEX] == [t for ids in learned for t in ids]
    ends = [ids[-1] for ids in learned]
    assert ends == [tok.eom_id if m.get("eom") else tok.eot_id for m in dialog if m["role"] == "assistant"]


def test_every_role_is_accepted_with_its_header():
    tok = ByteTokenizer()
    assert set(ROLES) == {"system", "user", "assistant", "tool", "ipython"}
    for role in ROLES:
        text = tok.decode(format_chat(tok, [{"role": role, "content": "x"}], add_generation_prompt=False).ids)
        header = "ipython" if role == "tool" else role
        assert text == f"<|begin_of_text|><|start_header_id|>{header}<|end_header_id|>\n\nx<|eot_id|>"


def test_format_chat_disallowed_special(meta, tok):
    dialog = DIALOGS["special-token text and unicode"]
    # Default: special-token text is ordinary characters, as in Meta's chat format.
    assert format_chat(tok, dialog).ids == meta.encode_dialog_prompt([_to_meta(m) for m in dialog]).tokens
    # "all": the first text part holding one is an error naming the message, the part and the token,
    # the token Meta's tokenizer refuses in that same text.
    meta_text = meta.tokenizer
    with pytest.raises(ValueError, match="disallowed special token '<\\|eot_id\\|>'"):
        meta_text.encode(dialog[1]["content"], bos=False, eos=False, disallowed_special="all")
    with pytest.raises(
        SpecialTokenError, match=re.escape("message 1, part 0: ") + ".*'<\\|eot_id\\|>'"
    ) as info:
        format_chat(tok, dialog, disallowed_special="all")
    assert info.value.token == "<|eot_id|>"
    # A collection refuses only its names: message 3's <|python_tag|> is the first one left.
    with pytest.raises(SpecialTokenError, match="message 3, part 0: .*<\\|python_tag\\|>"):
        format_chat(tok, dialog, disallowed_special={"<|python_tag|>"})
    with pytest.raises(SpecialTokenError, match="message 3, part 2: .*<\\|begin_of_text\\|>"):
        format_chat(tok, dialog, disallowed_special=["<|begin_of_text|>"])
    with pytest.raises(ValueError, match="<\\|eot\\|>"):  # a typo, even in a dialog without text
        format_chat(tok, DIALOGS["image only"], disallowed_special={"<|eot|>"})
    # Text without special-token strings is laid out exactly as Meta does, check or no check.
    clean = DIALOGS["every role"]
    assert (
        format_chat(tok, clean, disallowed_special="all").ids
        == meta.encode_dialog_prompt([_to_meta(m) for m in clean]).tokens
    )
