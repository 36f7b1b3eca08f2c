"""What :func:`mm.datasets.shards.pack` checks in each sample so that every reader can use it.

* **Media decode.** Images are opened with PIL restricted to common raster formats (so no plugin
  hands the bytes to an external program) and fully decoded by :func:`mm.datasets.images.load_image`
  (header size checks, truncation); videos pass :func:`mm.datasets.video.check_video` (container,
  stream, truncation, first frame); audio decodes with :func:`mm.datasets.audio.load_audio`;
  cached video features (``.safetensors``) have a well-formed header. Readers apply their own,
  usually tighter, caps (duration, pixels) at training time; here the caps are generous.
* **Text.** Captions, prompts and every text of a message are non-empty (not only whitespace) and
  at most :data:`MAX_TEXT_BYTES` bytes of UTF-8.
* **JSON.** A sample's JSON (a manifest line, a folder's ``.json``) is at most
  :data:`MAX_JSON_BYTES` bytes and :data:`MAX_JSON_DEPTH` arrays / objects deep, checked on the
  text before parsing (no ``RecursionError``); ``meta`` is at most :data:`MAX_META_BYTES` bytes.
* **Keys.** Non-empty, at most :data:`MAX_KEY_BYTES` bytes, NFC-normalised (so two spellings of one
  name cannot become two members that look alike), without control or format characters
  (NUL, tab, newline, bidirectional overrides, ...), backslashes, leading / trailing spaces in a
  part, empty / ``.`` / ``..`` parts, a leading ``/``, or a dot in the last part (the dot starts
  the field). ``/`` separates parts, as folder sub-paths do.

Every check raises ``ValueError`` with a message that names the limit; the caller adds the file
or manifest line.
"""

from __future__ import annotations

import io
import json
import re
import struct
import unicodedata
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_KEY_BYTES",
    "MAX_MEDIA_BYTES",
    "MAX_META_BYTES",
    "MAX_TEXT_BYTES",
    "check_field",
    "check_key",
    "check_medium",
    "check_message_texts",
    "check_meta",
    "check_text",
    "parse_json",
]

MAX_TEXT_BYTES = 1 << 20
"""Longest caption, prompt or message text, in bytes of UTF-8: 1 MiB (some 250k tokens)."""
MAX_META_BYTES = 1 << 20
"""Largest ``meta`` of a sample, as compact JSON: 1 MiB."""
MAX_JSON_BYTES = 8 << 20
"""Largest JSON of one sample (a manifest line, a folder's ``.json`` or ``.txt``): 8 MiB."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects in a sample's JSON (messages take 5 levels)."""
MAX_KEY_BYTES = 1024
"""Longest sample key, in bytes of UTF-8."""
MAX_MEDIA_BYTES = 2 << 30
"""Largest media file: 2 GiB (each is read whole to be checked)."""

# Common raster formats; PIL's other plugins include ones that run external programs (EPS).
PACK_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_BAD_KEY_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SAFETENSORS_HEADER_BYTES = 100 << 20


# --------------------------------------------------------------------------- JSON and text


def json_depth(text: str) -> int:
    """Deepest nesting of arrays / objects in JSON ``text``, found without parsing it."""
    depth = deepest = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def parse_json(text: str) -> Any:
    """``json.loads`` for one sample, within :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH`."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_JSON_BYTES:
        raise ValueError(f"JSON is {size} bytes, over the limit of {MAX_JSON_BYTES} bytes (MAX_JSON_BYTES)")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc})") from exc
    except RecursionError as exc:  # a limit the scan above should already enforce
        raise ValueError(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels (MAX_JSON_DEPTH)") from exc


def check_text(text: Any, what: str) -> str:
    """``text`` if it is a non-blank string of at most :data:`MAX_TEXT_BYTES` bytes."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ValueError(f"{what} is over the limit of {MAX_TEXT_BYTES} bytes (MAX_TEXT_BYTES): {size} bytes")
    if not text.strip():
        raise ValueError(f"{what} is empty" + (" (only whitespace)" if text else ""))
    return text


def check_message_texts(messages: list[dict[str, Any]]) -> None:
    """Every string content and text part of messages that passed ``check_messages``: :func:`check_text`."""
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            check_text(content, f"message {i}: text")
            continue
        for k, part in enumerate(content):
            if part["type"] == "text":
                check_text(part["text"], f"message {i}, part {k}: text")


def check_meta(meta: Any) -> None:
    """``meta`` is at most :data:`MAX_META_BYTES` bytes as compact JSON (depth is checked on parsing)."""
    size = len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    if size > MAX_META_BYTES:
        raise ValueError(f"meta is over the limit of {MAX_META_BYTES} bytes (MAX_META_BYTES): {size} bytes")


def check_key(key: Any) -> str:
    """The key, NFC-normalised, if it is a usable tar key (see the module docstring)."""
    if not isinstance(key, str) or not key:
        raise ValueError("'key' must be a non-empty string")
    key = unicodedata.normalize("NFC", key)
    for char in key:
        if unicodedata.category(char) in _BAD_KEY_CATEGORIES:
            raise ValueError(f"key {key!r} contains a control character (U+{ord(char):04X})")
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key is longer than {MAX_KEY_BYTES} bytes (MAX_KEY_BYTES): {size} bytes")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"key {key!r} must be a relative name with '/' between its parts (no '\\')")
    parts = key.split("/")
    if any(not part for part in parts):
        raise ValueError(f"key {key!r} has an empty part")
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"key {key!r} has a '.' or '..' part")
    if any(part != part.strip() for part in parts):
        raise ValueError(f"key {key!r} starts or ends a part with a space")
    if "." in parts[-1]:
        raise ValueError(f"key {key!r} must be a relative name without dots in its last part")
    return key


def check_field(field: str) -> str:
    """A member field from a file name (``0.png``): dot-separated parts, none empty, no control character."""
    for char in field:
        if unicodedata.category(char) in _BAD_KEY_CATEGORIES:
            raise ValueError(f"file name contains a control character (U+{ord(char):04X})")
    if any(not part or part != part.strip() for part in field.split(".")):
        raise ValueError(f"extension {'.' + field!r} has an empty part or one with spaces at its ends")
    return field


# --------------------------------------------------------------------------- media


def check_medium(data: bytes, kind: str, name: str) -> None:
    """Refuse media bytes no reader can decode; ``kind`` from :func:`~mm.datasets.shards.media_kind`."""
    if not data:
        raise ValueError("empty file (0 bytes), there is nothing to decode")
    if name.lower().rsplit(".", 1)[-1] == "safetensors":
        check = _check_safetensors
    elif kind in _CHECKS:
        check = _CHECKS[kind]
    else:
        raise ValueError(f"unknown media kind {kind!r}")
    try:
        check(data)
    except ValueError:
        raise
    except Exception as exc:  # decoders raise many types; none may end the pack without naming the file
        raise ValueError(f"cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _check_image(data: bytes) -> None:
    from PIL import Image

    from mm.datasets.images import ImageError, load_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data), formats=PACK_IMAGE_FORMATS).close()
    except Image.UnidentifiedImageError:
        raise ValueError(
            f"not an image in an accepted format ({', '.join(PACK_IMAGE_FORMATS)}), "
            "or its header is cut off or corrupt"
        ) from None
    except Exception:
        pass  # load_image describes every other failure
    try:
        load_image(data).close()
    except ImageError as exc:
        raise ValueError(_without_label(str(exc))) from None


def _check_video(data: bytes) -> None:
    from mm.datasets.video import VideoConfig, VideoError, check_video

    # Generous caps: this checks that the clip decodes; the trainer applies the recipe's caps.
    config = VideoConfig(
        num_frames=1,
        max_seconds=24 * 3600.0,
        max_pixels_per_frame=8192 * 8192,
        max_bytes=MAX_MEDIA_BYTES,
        max_stream_frames=10_000_000,
    )
    try:
        check_video(data, config=config)
    except VideoError as exc:
        raise ValueError(f"not a usable video: {exc}") from None


def _check_audio(data: bytes) -> None:
    from mm.datasets.audio import AudioConfig, AudioError, load_audio

    try:
        load_audio(data, config=AudioConfig(max_seconds=None, max_bytes=None))
    except AudioError as exc:
        raise ValueError(f"not usable audio: {_without_label(str(exc))}") from None


def _check_safetensors(data: bytes) -> None:
    """A well-formed safetensors header whose tensors lie inside the file (no tensor is read)."""

    def bad(why: str) -> ValueError:
        return ValueError(f"not a valid safetensors file: {why}")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if not 2 <= length <= min(len(data) - 8, _SAFETENSORS_HEADER_BYTES):
        raise bad(f"header length {length} does not fit the file of {len(data)} bytes")
    try:
        header = parse_json(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, Mapping):
        raise bad("header is not a JSON object")
    body = len(data) - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, Mapping) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {body} bytes of data")


_CHECKS = {"image": _check_image, "video": _check_video, "audio": _check_audio}


def _without_label(message: str) -> str:
    """Drop the loaders' own ``"image bytes (N bytes): "`` / ``"<bytes>: "`` label: the caller names the file."""
    return re.sub(r"^(image bytes \(\d+ bytes\)|<bytes>): ", "", message)
