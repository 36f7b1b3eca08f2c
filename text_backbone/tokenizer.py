"""Tokenizers for the Llama 3 text backbone, with mm's media placeholders.

Three kinds share one interface, :class:`Tokenizer`:

* :class:`TiktokenTokenizer` reads Meta's ``tokenizer.model`` (a tiktoken BPE ranks file) and
  adds the 256 Llama 3 special tokens right after the ranks (128000..128255 for the real file),
  named and numbered as Meta's reference (``llama-models``) does; its ids equal Meta's for any text.
* :class:`HFTokenizer` reads a Hugging Face ``tokenizer.json`` with the ``tokenizers`` library.
* :class:`ByteTokenizer` needs no file: 256 UTF-8 bytes plus 16 special tokens, for tiny models,
  tests and the demo.

Every kind has the same three media placeholders *after* its base vocabulary: ``<|image|>`` =
``vocab_size``, ``<|video|>`` = ``vocab_size + 1``, ``<|audio|>`` = ``vocab_size + 2``. They are not
rows of the backbone's embedding: the multimodal model consumes them (Llama 3.2 Vision likewise
puts ``<|image|>`` at 128256, one past the text vocabulary). A placeholder that the base vocabulary
numbers too (Meta's table has ``<|image|>`` = 128011, which its chat format rewrites to 128256
before the model) is an *alias*: the base id decodes to the name and counts as special, but
encoding the name, :meth:`Tokenizer.special_id` and :attr:`Tokenizer.special_tokens` give the
placeholder id; :attr:`Tokenizer.base_special_tokens` keeps the base vocabulary's own numbering.

Special-token strings in text become special ids only when the caller asks for it
(``allow_special=True``), so user text can never inject ``<|eot_id|>`` or a placeholder; by default
they are encoded as ordinary characters, and ``disallowed_special`` turns them into an error
(:class:`SpecialTokenError`) instead.

Reference: "The Llama 3 Herd of Models" (2024), section 3.2 (128K-token vocabulary built on
tiktoken) and section 4.1.1 (special header and turn tokens of the chat format).
"""

from __future__ import annotations

import abc
import base64
import codecs
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path

from mm._io import atomic_write_bytes, atomic_write_json

__all__ = [
    "BYTE_SPECIAL_TOKENS",
    "ByteTokenizer",
    "HFTokenizer",
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKENS",
    "PLACEHOLDERS",
    "SpecialTokenError",
    "StreamDecoder",
    "TOKENIZER_FILES",
    "TiktokenTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "read_tiktoken_ranks",
    "tokenizer_file",
]

PLACEHOLDERS: tuple[str, ...] = ("<|image|>", "<|video|>", "<|audio|>")
"""Media placeholders; the ``k``-th has id ``vocab_size + k`` in every tokenizer."""

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Pre-tokenizer regex of Llama 3 (that of tiktoken's cl100k_base)."""

_LLAMA3_NAMED = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    *_LLAMA3_NAMED,
    "<|image|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(_LLAMA3_NAMED) - 1)),
)
"""The 256 Llama 3 special tokens in id order, from ``len(ranks)`` (128000 for Meta's
``tokenizer.model``), as Meta's reference numbers them (``llama-models`` 0.3.0, Llama 3.2):
``<|image|>`` is the twelfth (128011), then ``<|reserved_special_token_2|>`` .. ``_245|>``.

Hugging Face's Llama 3.1 ``tokenizer.json`` names the same ids differently from 128005 on
(``<|reserved_special_token_2|>`` at 128005, ``_3|>`` at 128011, up to ``_247|>`` at 128255); only
the names differ, not the ids of the tokens the chat format uses."""

BYTE_SPECIAL_TOKENS: tuple[str, ...] = _LLAMA3_NAMED + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(2, 7)
)
"""The 16 special tokens of :class:`ByteTokenizer`, ids 256..271."""

# Meta splits very long inputs before tiktoken (openai/tiktoken#195: BPE over one huge piece is
# quadratic, and inputs past ~400K characters could panic); mm cuts at exactly the same places.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
# A run of more than _MAX_RUN_CHARS whitespace or non-whitespace characters, matched from its first
# character only (the lookbehinds make every other start fail at once: the scan stays linear).
# Python's \s is exactly str.isspace, the test Meta applies per character.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{_MAX_RUN_CHARS + 1},}}")


class SpecialTokenError(ValueError):
    """Text holds the string of a special token that the caller refused (``disallowed_special``).

    Attributes:
        token: the special token found first (leftmost).
        position: its character offset in the text.
    """

    def __init__(self, message: str, *, token: str, position: int) -> None:
        super().__init__(message)
        self.token = token
        self.position = position


class Tokenizer(abc.ABC):
    """Common interface of mm's tokenizers.

    Subclasses provide the base vocabulary (``_encode_text``, ``_decode_run``, :meth:`token_bytes`)
    and their special tokens; this class adds the media placeholders, bos/eos handling, special
    token parsing and decoding.

    Args:
        vocab_size: size of the base vocabulary, the backbone's embedding rows; placeholders excluded.
        special_tokens: special token string -> id, all below ``vocab_size``. A placeholder name among
            them (Meta's ``<|image|>`` = 128011) makes that id an alias of the placeholder.
    """

    def __init__(self, *, vocab_size: int, special_tokens: Mapping[str, int]) -> None:
        self.vocab_size = int(vocab_size)
        for name, idx in special_tokens.items():
            if not 0 <= idx < self.vocab_size:
                raise ValueError(f"special token {name} has id {idx}, outside [0, {self.vocab_size})")
        placeholders = {name: self.vocab_size + k for k, name in enumerate(PLACEHOLDERS)}
        self._base_special: dict[str, int] = dict(special_tokens)
        self._special: dict[str, int] = {**self._base_special, **placeholders}
        # Base ids standing for a placeholder: decoded as its name, replaced by its id when encoding.
        self._aliases: dict[int, int] = {
            idx: placeholders[name] for name, idx in special_tokens.items() if name in placeholders
        }
        self._special_names: dict[int, str] = {idx: name for name, idx in self._base_special.items()}
        self._special_names.update({idx: name for name, idx in placeholders.items()})
        self._placeholder_split = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")")
        self._all_special_pattern: re.Pattern[str] | None = None

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        """Encode one piece of text, no bos/eos. The base :meth:`_encode` hands it text without lone
        surrogates and, when ``allow_special``, without placeholders."""

    @abc.abstractmethod
    def _decode_run(self, ids: list[int]) -> str:
        """Decode ordinary (non-special) ids of the base vocabulary."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes an ordinary token stands for (possibly part of a character)."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the files :func:`load_tokenizer` reads back into ``directory``; return the file."""

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allow_special: bool = False,
        disallowed_special: str | Collection[str] = (),
    ) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the string to encode.
            bos: prepend ``<|begin_of_text|>``.
            eos: append ``<|end_of_text|>``.
            allow_special: map special-token strings (``<|eot_id|>``, ``<|image|>``, ...) to their
                ids (a placeholder to its placeholder id). Off by default: the strings are then
                encoded as ordinary text.
            disallowed_special: special-token strings that make the text an error instead, as in
                tiktoken and Meta's ``Tokenizer.encode``: ``"all"`` (every special token and
                placeholder, none when ``allow_special``) or a collection of names (checked even
                when ``allow_special``). The default ``()`` refuses nothing.

        Raises:
            SpecialTokenError: (a ``ValueError``) the text holds a disallowed special token; the
                message and ``.token`` name the leftmost one.
            ValueError: ``disallowed_special`` names something that is not a special token here.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        refused = self._disallowed_pattern(disallowed_special, allow_special)
        if refused is not None and (found := refused.search(text)) is not None:
            raise SpecialTokenError(
                f"the text holds the special token {found.group()!r} at character {found.start()}, "
                "which disallowed_special refuses",
                token=found.group(),
                position=found.start(),
            )
        ids = [self.bos_id] if bos else []
        if text:
            ids.extend(self._encode(text, allow_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        """Ids of non-empty ``text``, no bos/eos: placeholders cut out (when allowed), the rest by
        :meth:`_encode_text`."""
        text = _replace_lone_surrogates(text)
        if not allow_special:
            return self._encode_text(text, False)
        ids: list[int] = []
        for k, piece in enumerate(self._placeholder_split.split(text)):
            if k % 2:  # odd pieces are the captured placeholders
                ids.append(self._special[piece])
            elif piece:
                ids.extend(self._encode_text(piece, True))
        return ids

    def _disallowed_pattern(
        self, disallowed_special: str | Collection[str], allow_special: bool
    ) -> re.Pattern[str] | None:
        """The regex of the special-token strings to refuse, or None when nothing is refused."""
        if isinstance(disallowed_special, str):
            if disallowed_special != "all":
                raise ValueError(
                    f"disallowed_special must be 'all' or a collection of special tokens, "
                    f"got {disallowed_special!r}"
                )
            if allow_special:  # tiktoken: "all" means every special token that is not allowed
                return None
            if self._all_special_pattern is None:
                self._all_special_pattern = _alternation(self._special)
            return self._all_special_pattern
        names = set(disallowed_special)
        unknown = sorted(names - self._special.keys(), key=str)
        if unknown:
            raise ValueError(
                f"disallowed_special names {unknown}, not special tokens of this {type(self).__name__}"
            )
        return _alternation(names) if names else None

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """The text of ``ids``; special tokens and placeholders appear as their strings unless skipped."""
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = self._check_id(token_id)
            name = self._special_names.get(token_id)
            if name is None:
                run.append(token_id)
                continue
            if run:
                out.append(self._decode_run(run))
                run = []
            if not skip_special:
                out.append(name)
        if run:
            out.append(self._decode_run(run))
        return "".join(out)

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size + len(PLACEHOLDERS):
            raise ValueError(
                f"token id {token_id} is outside [0, {self.vocab_size + len(PLACEHOLDERS)}) of "
                f"{type(self).__name__}"
            )
        return token_id

    # ------------------------------------------------------------------ special tokens
    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token and placeholder, string -> the id the model consumes (a copy).

        A placeholder is always reported with its placeholder id (``<|image|>`` = ``vocab_size``),
        also where the base vocabulary numbers it too (see :attr:`base_special_tokens`).
        """
        return dict(self._special)

    @property
    def base_special_tokens(self) -> dict[str, int]:
        """The special tokens as the base vocabulary numbers them, string -> id (a copy).

        For Meta's ``tokenizer.model`` this equals ``llama_models``' ``Tokenizer.special_tokens``,
        ``<|image|>`` = 128011 included; placeholders after the base vocabulary are not in it.
        """
        return dict(self._base_special)

    def special_id(self, name: str) -> int:
        """The id of the special token or placeholder ``name`` (e.g. ``"<|eot_id|>"``); for a
        placeholder, its placeholder id."""
        try:
            return self._special[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of this {type(self).__name__}") from None

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token, a placeholder or a base id aliasing one."""
        return int(token_id) in self._special_names

    @property
    def bos_id(self) -> int:
        return self.special_id("<|begin_of_text|>")

    @property
    def eos_id(self) -> int:
        return self.special_id("<|end_of_text|>")

    @property
    def eot_id(self) -> int:
        return self.special_id("<|eot_id|>")

    @property
    def eom_id(self) -> int:
        return self.special_id("<|eom_id|>")

    @property
    def pad_id(self) -> int:
        return self.special_id("<|finetune_right_pad_id|>")

    @property
    def start_header_id(self) -> int:
        return self.special_id("<|start_header_id|>")

    @property
    def end_header_id(self) -> int:
        return self.special_id("<|end_header_id|>")

    @property
    def image_id(self) -> int:
        return self.vocab_size

    @property
    def video_id(self) -> int:
        return self.vocab_size + 1

    @property
    def audio_id(self) -> int:
        return self.vocab_size + 2

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops at ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>`` (those this vocabulary has)."""
        names = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        return tuple(self._special[n] for n in names if n in self._special)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------- bytes
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256..271 the special tokens of
    :data:`BYTE_SPECIAL_TOKENS` (same order as Llama 3's first eleven), ``vocab_size`` 272.

    Needs no files; the ``tiny`` text preset is sized for it.
    """

    def __init__(self) -> None:
        specials = {name: 256 + k for k, name in enumerate(BYTE_SPECIAL_TOKENS)}
        super().__init__(vocab_size=256 + len(BYTE_SPECIAL_TOKENS), special_tokens=specials)
        names = sorted(BYTE_SPECIAL_TOKENS, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for k, piece in enumerate(self._special_split.split(text)):
            ids.extend([self._special[piece]] if k % 2 else piece.encode("utf-8"))
        return ids

    def _decode_run(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if not 0 <= token_id < 256:
            raise ValueError(f"token id {token_id} is not a byte token")
        return bytes([token_id])

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "mm_tokenizer.json"
        atomic_write_json(path, {"type": "byte"})
        return path


# ---------------------------------------------------------------------------------------- tiktoken
def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The BPE ranks of a ``tokenizer.model``: one ``base64(token) rank`` line per token.

    Read as tiktoken's ``load_tiktoken_bpe`` reads them (empty lines skipped), but strictly and
    without its cache: every error names the file and the line.

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not ``base64(token) rank``, a token repeats, or there is no token.
    """
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError:  # binascii.Error is one
            raise ValueError(f"{path} line {number} is not 'base64(token) rank': {line[:60]!r}") from None
        if token in ranks:
            raise ValueError(f"{path} line {number} repeats the token {token!r}")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} holds no tokens")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 ``tokenizer.model``: tiktoken BPE ranks (lines ``base64(token) rank``).

    The ranks are the ids of the base vocabulary; the 256 :data:`LLAMA3_SPECIAL_TOKENS` follow
    them, and ``vocab_size`` is ``len(ranks) + 256`` (128256 for Llama 3). Everything matches Meta's
    reference ``Tokenizer`` (``llama-models``): the special-token table (:attr:`base_special_tokens`),
    and the ids of any text, also past 400K characters, where both cut the text at the same places
    before BPE. One deliberate difference: ``<|image|>`` (128011 in Meta's table) encodes, with
    ``allow_special``, to the placeholder ``vocab_size``, the id Meta's chat format gives the model.

    Args:
        path: the ranks file, or a folder holding ``tokenizer.model``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import tiktoken

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tiktoken ranks file not found: {path}")
        ranks = read_tiktoken_ranks(path)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: ranks are not the ids 0..{len(ranks) - 1} each used once")
        num_base = len(ranks)
        specials = {name: num_base + k for k, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        super().__init__(vocab_size=num_base + len(specials), special_tokens=specials)
        self._ranks = ranks
        # tiktoken also learns <|video|> and <|audio|>: with allow_special one call then finds every
        # special string, and the text is cut once, as a whole, exactly as Meta cuts it.
        extra = {name: idx for name, idx in self._special.items() if name not in specials}
        self._encoding = tiktoken.Encoding(
            name=path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={**specials, **extra},
        )

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        # Meta cuts the whole string, special-token strings included, before tiktoken sees it; and
        # tiktoken replaces lone surrogates itself, in each piece, as it does for Meta.
        ids: list[int] = []
        for piece in _split_long(text):
            ids.extend(self._encode_text(piece, allow_special))
        return ids

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special:
            return self._encoding.encode_ordinary(text)
        ids = self._encoding.encode(text, allowed_special="all", disallowed_special=())
        if not self._aliases.keys().isdisjoint(ids):  # Meta's <|image|> id -> the placeholder
            ids = [self._aliases.get(i, i) for i in ids]
        return ids

    def _decode_run(self, ids: list[int]) -> str:
        return self._encoding.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(int(token_id))

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.model"
        ordered = sorted(self._ranks.items(), key=lambda item: item[1])
        atomic_write_bytes(path, b"".join(b"%s %d\n" % (base64.b64encode(t), r) for t, r in ordered))
        return path


def _split_long(text: str) -> Iterator[str]:
    """Cut ``text`` where Meta's ``Tokenizer.encode`` cuts it before BPE.

    Meta takes chunks of ``_MAX_ENCODE_CHARS`` characters, at fixed offsets (even inside a word or
    a special-token string), and inside each chunk cuts every run of whitespace (``str.isspace``)
    or of non-whitespace characters after each ``_MAX_RUN_CHARS`` of its characters; a run starts
    afresh at a chunk's start. Same pieces, same ids. Text of at most ``_MAX_RUN_CHARS`` characters
    cannot be cut and is yielded whole without a scan (the common case); longer text is scanned by
    one regex for over-long runs, not character by character.
    """
    if len(text) <= _MAX_RUN_CHARS:
        yield text
        return
    for offset in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[offset : offset + _MAX_ENCODE_CHARS]
        start = 0  # start of the piece being gathered
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


def _alternation(names: Iterable[str]) -> re.Pattern[str]:
    """A regex finding any of ``names`` (longest first where one starts another)."""
    return re.compile("|".join(map(re.escape, sorted(names, key=lambda n: (-len(n), n)))))


# ---------------------------------------------------------------------------------------- Hugging Face
class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, read with the ``tokenizers`` library.

    ``vocab_size`` is one past the largest id that is not a placeholder. Special ids are found by
    content among the file's special added tokens. A file that defines a placeholder itself as a
    special token gives it either mm's id, ``vocab_size + k`` (Llama 3.2 Vision has ``<|image|>`` =
    128256), or an id inside the base vocabulary, which then aliases the placeholder (Meta's table
    converted to ``tokenizer.json`` has ``<|image|>`` = 128011), as in :class:`TiktokenTokenizer`.

    Args:
        path: the ``tokenizer.json`` file, or a folder holding it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            # Two instances instead of toggling a flag per call: encode stays safe across threads.
            self._with_specials = RustTokenizer.from_str(text)
            self._plain = RustTokenizer.from_str(text)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            if isinstance(e, OSError):
                raise
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        self._plain.encode_special_tokens = True  # special-token strings encode as ordinary text

        vocab = self._plain.get_vocab(with_added_tokens=True)
        added = self._plain.get_added_tokens_decoder()
        base_ids = [idx for content, idx in vocab.items() if content not in PLACEHOLDERS]
        if not base_ids:
            raise ValueError(f"{path}: the vocabulary is empty")
        vocab_size = max(base_ids) + 1
        for k, name in enumerate(PLACEHOLDERS):
            if name not in vocab:
                continue
            if vocab[name] >= vocab_size and vocab[name] != vocab_size + k:
                raise ValueError(
                    f"{path} defines {name} as id {vocab[name]}, but mm places it at vocab_size + {k} "
                    f"= {vocab_size + k} (or accepts an alias inside the base vocabulary)"
                )
            token = added.get(vocab[name])
            if token is None or not token.special:
                raise ValueError(f"{path} defines {name} as an ordinary token; it must be special")
        specials = {tok.content: idx for idx, tok in added.items() if tok.special and idx < vocab_size}
        super().__init__(vocab_size=vocab_size, special_tokens=specials)
        self._byte_level = _uses_byte_level(json.loads(text).get("decoder"))
        self._added_content = {idx: tok.content for idx, tok in added.items()}

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        backend = self._with_specials if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def _decode_run(self, ids: list[int]) -> str:
        return self._with_specials.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Exact bytes for byte-level vocabularies (all Llama 3 ones); otherwise the token's text."""
        token_id = int(token_id)
        if token_id in self._added_content:
            return self._added_content[token_id].encode("utf-8")
        piece = self._with_specials.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if self._byte_level:
            table = _unicode_to_byte()
            try:
                return bytes(table[ch] for ch in piece)
            except KeyError:
                pass
        return self._with_specials.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        atomic_write_bytes(path, self._with_specials.to_str(pretty=True).encode("utf-8"))
        return path


def _uses_byte_level(decoder: Mapping | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(d) for d in decoder.get("decoders") or ())


_BYTE_TABLE: dict[str, int] = {}


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the
    other 68 bytes are shifted, in byte order, to U+0100 onwards."""
    if not _BYTE_TABLE:
        printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
        shifted = [b for b in range(256) if b not in set(printable)]
        _BYTE_TABLE.update({chr(b): b for b in printable})
        _BYTE_TABLE.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return _BYTE_TABLE


# ---------------------------------------------------------------------------------------- loading
#: The files :func:`load_tokenizer` looks for in a folder, the first found deciding.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model", "mm_tokenizer.json")


def tokenizer_file(folder: str | os.PathLike) -> Path | None:
    """The file :func:`load_tokenizer` reads in ``folder`` (``None`` when there is none)."""
    return next((Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()), None)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Open the tokenizer stored at ``path``.

    In a folder, the first of these decides: ``tokenizer.json`` (:class:`HFTokenizer`),
    ``tokenizer.model`` or ``original/tokenizer.model`` (:class:`TiktokenTokenizer`),
    ``mm_tokenizer.json`` (``{"type": "byte"}``: :class:`ByteTokenizer`). A path to one of these
    files works too (a ``.json`` file is told apart by its content).
    """
    path = Path(path)
    if path.is_dir():
        found = tokenizer_file(path)
        if found is None:
            raise FileNotFoundError(f"no tokenizer in {path}: looked for {', '.join(TOKENIZER_FILES)}")
        return load_tokenizer(found)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.suffix != ".json":
        return TiktokenTokenizer(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "model" in data:
        return HFTokenizer(path)
    if isinstance(data, dict) and data == {"type": "byte"}:
        return ByteTokenizer()
    raise ValueError(f"{path} is neither a Hugging Face tokenizer.json nor mm's {{'type': 'byte'}}")


def _replace_lone_surrogates(text: str) -> str:
    """Lone surrogates (invalid in UTF-8) become U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# ---------------------------------------------------------------------------------------- streaming
class StreamDecoder:
    """Turn generated token ids into text one id at a time.

    A character split across tokens is held back until its last byte arrives, so no replacement
    character is ever emitted for an incomplete sequence; :meth:`flush` emits what is left (bytes
    that never completed become U+FFFD). For byte-level vocabularies (every tokenizer here, and
    every Llama 3 ``tokenizer.json``) the concatenated output equals
    ``tokenizer.decode(all_ids, skip_special=skip_special)``.

    Args:
        tokenizer: the tokenizer that produced the ids.
        skip_special: drop special tokens and placeholders instead of emitting their strings.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        token_id = self.tokenizer._check_id(token_id)
        if self.tokenizer.is_special(token_id):
            text = self.flush()  # a special token ends any pending character
            return text if self.skip_special else text + self.tokenizer._special_names[token_id]
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Emit held-back bytes and start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
