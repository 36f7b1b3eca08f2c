"""mm's tiktoken tokenizer against Meta's reference, with the real Llama 3 ``tokenizer.model``.

The oracle is ``llama_models.llama3.tokenizer.Tokenizer`` (llama-models 0.3.0, a test-only
dependency) reading the ``tokenizer.model`` it ships: the special-token table, the ids of a varied
corpus and of long inputs (where Meta cuts the text before BPE), and ``disallowed_special``.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import llama_models.llama3.tokenizer as meta_tokenizer
import pytest

from mm.text_backbone.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    SpecialTokenError,
    TiktokenTokenizer,
    _split_long,
)

MODEL_PATH = Path(meta_tokenizer.__file__).parent / "tokenizer.model"
META_IMAGE_ID = 128011
"""``<|image|>`` in Meta's table; its chat format hands the model 128256 instead."""


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer.Tokenizer(MODEL_PATH)


@pytest.fixture(scope="module")
def tok():
    return TiktokenTokenizer(MODEL_PATH)


def _meta_pieces(text: str) -> list[str]:
    """Where Meta's ``Tokenizer.encode`` cuts ``text`` before tiktoken."""
    step = meta_tokenizer.TIKTOKEN_MAX_ENCODE_CHARS
    split = meta_tokenizer.Tokenizer._split_whitespaces_or_nonwhitespaces
    return [
        piece
        for i in range(0, len(text), step)
        for piece in split(text[i : i + step], meta_tokenizer.MAX_NO_WHITESPACES_CHARS)
    ]


def _model_ids(ids: list[int]) -> list[int]:
    """Meta's ids as its chat format hands them to the model (``_model_input_from_tokens_images``)."""
    return [128256 if i == META_IMAGE_ID else i for i in ids]


# ---------------------------------------------------------------------------------------- corpus
WHITESPACE = [
    " ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0",
    "\u1680", "\u2000", "\u2007", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
]  # fmt: skip
"""Every kind of str.isspace character class, \\r\\n included."""
BLANK_NOT_SPACE = ["\u200b", "\u200d", "\ufeff", "\u180e", "\u2060"]
"""Characters that look blank but are not whitespace for Meta (zero-width ones)."""

SAMPLES = [
    "",
    " ",
    "\n",
    "Hello world! How's it going? I'M FINE, they'LL see; we'd've DONE it. 'S 'T 'RE 'VE 'M 'LL 'D",
    "curly contractions don’t it’s we’re — “quoted” ‘single’ … «guillemets» ‹›",
    "日本語のテキストです。中文文本，繁體中文。한국어 텍스트입니다. カタカナ ひらがな",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷🇯🇵 🌍🚀✨ ❤️ 1️⃣ #️⃣",
    "combining e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0360\u0361\u0362a\u0336b\u0336 \u0301lead",
    "RTL שלום עולם \u200fمرحبا بالعالم\u200e 123 \u202bembedded\u202c \u05d0\u05b8 ‏abc",
    "scripts สวัสดีครับ नमस्ते दुनिया Привет мир ελληνικά ქართული አማርኛ ᐃᓄᒃᑎᑐᑦ",
    "digits 1 12 123 1234 12345 1234567890123 ٣٤٥ ١٢٣٤ ०१२३ 3.14159 -42 1e-10 0x1F ½ ² Ⅻ ①",
    "def f(x):\n    return x ** 2  # square\n\tpass\n\n\nclass A:\r\n    pass\r\n",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b\\n"}}\n<div class="x">&amp;</div>',
    r"regex: ^(?:\s+|\d{3,})$ path C:\Users\me\file.txt \\server\share",
    "special <|eot_id|> and <|begin_of_text|> inside text, and <|image|> too",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|python_tag|><|eom_id|>",
    "<|reserved_special_token_245|> <|reserved_special_token_246|> <|reserved_special_token_250|>",
    "<|video|> <|audio|> <|eot_id <||eot_id||> <|EOT_ID|> <| eot_id |> <|eot_id|><|eot_id|>",
    "lone surrogates \ud800 and \udfff, a pair \ud83c\udf0d, reversed \udf0d\ud83c",
    "controls \x00\x01\x07\x1b[31m red \x1b[0m \x7f \x80 \x9f",
    "a" * 300,
    " " * 300 + "x" + "\n" * 50 + "\t" * 20,
    "".join(WHITESPACE) + "x" + "".join(BLANK_NOT_SPACE) + "y",
    *(f"word{ws * n}next{ws}" for ws in WHITESPACE for n in (1, 2, 3, 7)),
    *(f"{ws}{ws}lead and trail{ws}" for ws in WHITESPACE),
    *(f"zero{ch}width{ch * 3}" for ch in BLANK_NOT_SPACE),
]

_FRAGMENTS = [
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "HELLO", "World", "'s", "'LL", "n't", "’", ".", ",", "!", "?", "...", "--", "->", "(", ")", "**",
    "0", "7", "42", "123", "2024", "99999", "3.14", "日本", "東京", "中文", "한국", "Привет", "ελ",
    "🌍", "🚀", "👩‍👧", "e\u0301", "\u0301", "עב", "عر", "\u200f", "<|eot_id|>", "<|image|>",
    "<|begin_of_text|>", "<|", "|>", "\\", '"', "\ud800",
]  # fmt: skip


def _random_texts(seed: int, count: int) -> list[str]:
    """Strings of words, numbers, scripts, emoji, marks, special-looking text and whitespace runs."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.3:
                parts.append(rng.choice(WHITESPACE + BLANK_NOT_SPACE) * rng.choice((1, 1, 2, 3, 5)))
            else:
                parts.append(rng.choice(_FRAGMENTS))
        texts.append("".join(parts))
    return texts


# ---------------------------------------------------------------------------------------- tests
def test_special_token_table_equals_meta(meta, tok):
    assert len(meta.special_tokens) == 256
    assert tok.base_special_tokens == meta.special_tokens
    assert tuple(sorted(meta.special_tokens, key=meta.special_tokens.get)) == LLAMA3_SPECIAL_TOKENS
    assert tok.vocab_size == meta.n_words == 128256
    # The model-facing table: Meta's, except <|image|> at the placeholder Meta's model receives.
    assert tok.special_tokens == {
        **meta.special_tokens,
        "<|image|>": 128256,
        "<|video|>": 128257,
        "<|audio|>": 128258,
    }
    for name, idx in meta.special_tokens.items():
        model_id = tok.image_id if name == "<|image|>" else idx
        assert tok.special_id(name) == model_id, name
        assert meta.encode(name, bos=False, eos=False, allowed_special="all") == [idx]
        assert tok.encode(name, allow_special=True) == [model_id], name
        assert tok.encode(name) == meta.encode(name, bos=False, eos=False), name  # literal
        assert tok.is_special(idx) and tok.decode([idx]) == meta.decode([idx]) == name
        assert tok.decode([idx], skip_special=True) == ""
    assert tok.special_id("<|image|>") == 128256 and tok.base_special_tokens["<|image|>"] == META_IMAGE_ID
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.pad_id) == (
        meta.bos_id,
        meta.eos_id,
        meta.eot_id,
        meta.eom_id,
        meta.pad_id,
    )
    assert tok.special_id("<|python_tag|>") == meta.python_tag_id
    assert list(tok.stop_ids) == meta.stop_tokens


def test_encode_matches_meta_on_varied_text(meta, tok):
    texts = SAMPLES + _random_texts(seed=0, count=1500)
    for text in texts:
        expected = meta.encode(text, bos=False, eos=False)
        assert tok.encode(text) == expected, repr(text)
        assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
        assert tok.decode(expected) == meta.decode(expected), repr(text)
        with_specials = meta.encode(text, bos=False, eos=False, allowed_special="all")
        if "<|video|>" in text or "<|audio|>" in text:  # placeholders Meta does not have
            continue
        assert tok.encode(text, allow_special=True) == _model_ids(with_specials), repr(text)
        assert tok.decode(_model_ids(with_specials)) == meta.decode(with_specials)
    mixed = "a<|video|>b<|image|>c<|audio|><|eot_id|>"
    assert tok.encode(mixed, allow_special=True) == [
        *tok.encode("a"),
        tok.video_id,
        *tok.encode("b"),
        tok.image_id,
        *tok.encode("c"),
        tok.audio_id,
        tok.eot_id,
    ]


def _long_inputs() -> dict[str, str]:
    """Long inputs around Meta's two limits (400K-character chunks, 25K-character runs)."""
    filler = " ".join(SAMPLES[3:17]) + " "  # no <|video|>: Meta spells it out, mm does not
    filler = (filler * (450_000 // len(filler) + 1))[:450_000]
    mixed = filler[:300_000] + " " * 60_000 + filler[:200_000] + "x" * 30_000 + filler[:250_000]
    return {
        "mixed >400K with long runs": mixed,  # 840K characters, 3 chunks
        "60K-space run": "a" + " " * 60_000 + "b",
        "60K tabs": "\t" * 60_000,
        "60K ideographic spaces": "\u3000" * 60_000,
        "60K mixed whitespace": ("\t \n\u3000\xa0\r\n\u2028\x0b" * 7_500)[:60_000] + "end",
        "30K letters": "x" * 30_000,
        "30K CJK": "日本" * 15_000,
        "30K emoji": "🌍" * 30_000,
        "30K digits": "1234567890" * 3_000,
        "30K punctuation": "!?" * 15_000,
        "30K zero-width (not space)": "\u200b" * 30_000,
        "run of 25,000": " " + "y" * 25_000 + " ",
        "run of 25,001": " " + "y" * 25_001 + " ",
        "spaces 25,000 / 25,001": " " * 25_000 + "z" + " " * 25_001,
        "runs of 50,000 / 50,001 / 75,001": "q" * 50_000 + " " + "q" * 50_001 + " " + "q" * 75_001,
        "400,001 characters, cut inside a word": ("hello " * 66_667)[:400_001],
        "400,000 characters exactly": ("hello " * 66_667)[:400_000],
        "special token across 400K": filler[:399_995] + "<|eot_id|> tail",
        "\\r\\n across 400K": filler[:399_999] + "\r\n" + "x",
        "combining mark across 400K": filler[:399_999] + "e\u0301",
        "emoji ZWJ across 400K": filler[:399_998] + "👩\u200d👧 after",
        "surrogate pair across 400K": filler[:399_999] + "\ud83c\udf0d",
        "space run across 400K": filler[:399_990] + " " * 30 + "word",
        "30K run across 400K": filler[:399_000] + "x" * 30_000 + " end",
        "40K spaces across 400K": filler[:380_000] + " " * 40_000 + "end",
        "25K run ending at 400K": filler[:374_999] + " " + "k" * 25_000 + "k" * 30 + " ",
        "800,001 letters": "x" * 800_001,
    }


def test_long_inputs_are_cut_and_encoded_as_meta_does(meta, tok):
    inputs = _long_inputs()
    for name, text in inputs.items():
        pieces = list(_split_long(text))
        assert pieces == _meta_pieces(text), name
        assert tok.encode(text) == meta.encode(text, bos=False, eos=False), name
    # Meta's 400K cut falls inside the last <|eot_id|>: both then spell that one out.
    text = inputs["special token across 400K"]
    expected = meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert expected.count(tok.eot_id) == text.count("<|eot_id|>") - 1
    assert tok.encode(text, allow_special=True) == _model_ids(expected)
    # Short text is handed to BPE whole, without a scan or a copy.
    short = "w" * 25_000
    assert [p is short for p in _split_long(short)] == [True]


def test_split_on_random_runs_matches_meta():
    rng = random.Random(1)
    lengths = [1, 2, 24_999, 25_000, 25_001, 49_999, 50_000, 50_001, 77_777]
    kinds = ["x", "日", " ", "\t", "\u3000", "\r\n", "\u200b"]
    for _ in range(12):
        text = "".join(rng.choice(kinds) * rng.choice(lengths) for _ in range(rng.randint(2, 14)))
        assert list(_split_long(text)) == _meta_pieces(text), len(text)


def test_regex_whitespace_is_str_isspace():
    # _split_long finds runs with re's \s; Meta tests str.isspace per character. Every code point:
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    assert re.findall(r"\s", every) == [c for c in every if c.isspace()]


_DISALLOWED_TEXTS = [
    "plain text, nothing special",
    "hi <|eot_id|> there",
    "<|begin_of_text|>",
    "x <|image|> y",
    "<|reserved_special_token_245|>",
    "<|reserved_special_token_250|> is no special token",
    "a <|eot_id b <||eot_id||> <|EOT_ID|>",
    "<|start_header_id|>user<|end_header_id|> then <|eot_id|>",
    "prefix <|python_tag|><|eom_id|>",
]


@pytest.mark.parametrize("disallowed", ["all", ("<|eot_id|>",), {"<|begin_of_text|>", "<|image|>"}, ()])
def test_disallowed_special_matches_meta(meta, tok, disallowed):
    for text in _DISALLOWED_TEXTS:
        try:
            expected = meta.encode(text, bos=False, eos=False, disallowed_special=disallowed)
        except ValueError as err:  # tiktoken names the token it found
            token = re.search(r"disallowed special token '(.+?)'", str(err)).group(1)
            with pytest.raises(SpecialTokenError, match=re.escape(repr(token))) as info:
                tok.encode(text, disallowed_special=disallowed)
            assert isinstance(info.value, ValueError)
            assert (info.value.token, info.value.position) == (token, text.index(token))
        else:
            assert tok.encode(text, disallowed_special=disallowed) == expected, text
        # Allowing every special token leaves "all" nothing to refuse; named tokens still are.
        try:
            expected = meta.encode(
                text, bos=False, eos=False, allowed_special="all", disallowed_special=disallowed
            )
        except ValueError:
            with pytest.raises(SpecialTokenError):
                tok.encode(text, allow_special=True, disallowed_special=disallowed)
        else:
            assert tok.encode(text, allow_special=True, disallowed_special=disallowed) == _model_ids(expected)


def test_disallowed_special_where_mm_differs(meta, tok):
    # mm's placeholders are special tokens too.
    with pytest.raises(SpecialTokenError, match="<\\|video\\|>"):
        tok.encode("a <|video|>", disallowed_special="all")
    # mm checks the whole text; Meta checks each piece after its 400K cut, so misses a token cut in two.
    text = "a" * 399_995 + "<|eot_id|>"
    assert meta.encode(text, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(SpecialTokenError, match="399995"):
        tok.encode(text, disallowed_special="all")
    # A typo would otherwise refuse nothing.
    with pytest.raises(ValueError, match="<\\|eot\\|>"):
        tok.encode("x", disallowed_special={"<|eot|>"})
    with pytest.raises(ValueError, match="'none'"):
        tok.encode("x", disallowed_special="none")
