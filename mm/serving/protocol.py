"""The OpenAI Chat Completions protocol as ``mm serve`` speaks it: requests checked, answers built.

``POST /v1/chat/completions`` takes OpenAI's body. Messages hold a string or ``text``,
``image_url``, ``video_url`` and ``input_audio`` parts (``data:`` URIs always; ``http(s)`` only
from hosts named with ``--allow-media-domain``; see :mod:`mm.datasets.media`; a video is decoded
under the model's video settings with the server's byte and pixel limits, ``max_videos`` per
request; ``input_audio`` is base64 wav or mp3 under the same byte limit, decoded under the model's
audio settings, ``max_audios`` per request). With ``modalities: ["text", "audio"]`` and
``audio: {"voice": "heart", "format": "wav"}`` the message also carries OpenAI's ``audio`` field:
the answer spoken offline by hibari-tts's bundled voice, as base64 WAV (not with ``stream``).
``stream: true`` answers with server-sent events (``chat.completion.chunk`` objects: the role
first, then content deltas, then a chunk with the ``finish_reason``, optionally a usage chunk, then
``data: [DONE]``). Supported: ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``, ``n=1``, ``stream_options.include_usage``.

**Errors** are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
requests and passed limits (the message names the limit), 404 for another model id, 413 for a body
over ``max_request_bytes`` (checked from ``Content-Length`` before reading, and counted while
reading), 429 past ``max_concurrent_requests``. A request never makes the server read a local
file, unpickle anything or hold unbounded memory: the body, each image's bytes and pixels, each
video's bytes, frame size, duration and decoded frames, each audio clip's bytes and duration, the
number of images, videos and audio clips, prompt length, new tokens and concurrent requests are all
bounded.

Here: the request body read under its byte limit and parsed (:func:`read_body`,
:func:`parse_json`), checked against the protocol and the limits (:func:`parse_chat_request`), the
media policy and published limits that follow from :class:`~mm.serving.limits.ServerLimits` and
the model's own settings, and the response bodies and stream events, as pure functions. Nothing
here imports torch or FastAPI.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from mm.serving.limits import ServerLimits

__all__ = [
    "DONE_EVENT",
    "ChatRequest",
    "RequestError",
    "audio_caps",
    "chunk_event",
    "completion_body",
    "error_event",
    "media_policy_for",
    "parse_chat_request",
    "parse_json",
    "published_limits",
    "read_body",
    "token_usage",
    "video_caps",
]

_MAX_STOP_STRINGS = 4
#: Seeds a request may give (those a torch generator takes: 64 bits, kept non-negative).
SEED_MAX = 2**63 - 1
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs")

DONE_EVENT = "data: [DONE]\n\n"
"""The last server-sent event of a stream."""


class RequestError(Exception):
    """A request the server refuses, as an OpenAI-style error with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------- the body
async def read_body(request, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (declared or counted) without keeping the
    excess, and with 408 when it has not all arrived within ``timeout_s`` seconds.

    A refused body is still read and dropped, up to another ``limit`` bytes, so the client can
    finish sending and read the 413 instead of a reset connection.

    Args:
        request: a Starlette request (``headers`` and the async ``stream()`` of body chunks).
        limit: ``max_request_bytes``.
        timeout_s: ``request_timeout_s`` (``None``: no deadline).
    """
    import asyncio

    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(
            408,
            f"the request body did not arrive within {timeout_s:g} seconds (request_timeout_s)",
            code="request_timeout",
        ) from None


async def _read_body(request, limit: int) -> bytes:

    def too_large(size: str) -> RequestError:
        return RequestError(
            413,
            f"the request body is {size} bytes, more than this server's limit of {limit} bytes "
            "(max_request_bytes)",
            code="request_too_large",
        )

    declared = request.headers.get("content-length")
    error = None
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "malformed Content-Length header", code="invalid_body")
        if int(declared) > limit:
            error = too_large(declared.strip())
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if error is None and size > limit:
            error = too_large(f"more than {limit}")
        if error is not None:
            chunks.clear()
            if size > 2 * limit:
                break
            continue
        chunks.append(chunk)
    if error is not None:
        raise error
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The JSON value of a body; 400 when it is not JSON or nested too deeply to parse."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply", code="invalid_json") from None


# ---------------------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class ChatRequest:
    """A checked ``/v1/chat/completions`` body; ``max_tokens`` is ``None`` when the request named none."""

    messages: list[dict[str, Any]]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    speak: bool = False


def parse_chat_request(body: Any, *, model_id: str, limits: ServerLimits) -> ChatRequest:
    """Check a request body against the protocol and the limits (media are checked later).

    Raises:
        RequestError: 400 for a malformed body or a passed limit, 404 for another model.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", code="invalid_body")
    _check_model(body, model_id)
    messages = _messages(body)
    _check_unsupported(body)
    max_tokens = _max_tokens(body, limits)
    stop = _stop(body)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", param="stream")
    speak = _speech_output(body, stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_int(body, "seed", 0, SEED_MAX),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        speak=speak,
    )


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(
            404,
            f"the model {model!r} does not exist; this server serves {model_id!r}",
            param="model",
            code="model_not_found",
        )


def _messages(body: dict) -> list[dict[str, Any]]:
    """Role and content of each message (``developer`` is ``system``); the content is checked later."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            400, "'messages' must be a non-empty list", param="messages", code="invalid_messages"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if message.get("content") is None:
            raise RequestError(400, f"messages[{i}] has no 'content'", param=f"messages[{i}].content")
        checked.append({"role": role, "content": message["content"]})
    return checked


def _check_unsupported(body: dict) -> None:
    """Tools, log-probabilities, structured output and ``n`` above 1 are refused, never ignored."""
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(
                400, f"'{name}' is not supported by this server", param=name, code="unsupported"
            )
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    n = _int(body, "n")
    if n not in (None, 1):
        raise RequestError(
            400, f"'n' must be 1 (one answer per request), got {n}", param="n", code="invalid_value"
        )


def _max_tokens(body: dict, limits: ServerLimits) -> int | None:
    """The smaller of ``max_completion_tokens`` and ``max_tokens``, each within the server's limit."""
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = _int(body, name)
        if value is None:
            continue
        if value < 1:
            raise RequestError(400, f"'{name}' must be >= 1, got {value}", param=name, code="invalid_value")
        if value > limits.max_tokens:
            raise RequestError(
                400,
                f"'{name}' is {value}, more than this server's limit of {limits.max_tokens} new tokens per "
                "request (max_tokens)",
                param=name,
                code="max_tokens_exceeded",
            )
        max_tokens = value if max_tokens is None else min(max_tokens, value)
    return max_tokens


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stop) > _MAX_STOP_STRINGS:
        raise RequestError(
            400, f"'stop' holds {len(stop)} strings; at most {_MAX_STOP_STRINGS}", param="stop"
        )
    return tuple(stop)


def _speech_output(body: dict, stream: bool) -> bool:
    """Whether the answer is also spoken: ``modalities: ["text", "audio"]`` with ``audio: {"voice":
    <a bundled voice>, "format": "wav"}`` (OpenAI's request fields; mm speaks offline with
    hibari-tts's bundled voice, never one it would download)."""
    modalities = body.get("modalities")
    if modalities is None:
        modalities = ["text"]
    if (
        not isinstance(modalities, list)
        or not modalities
        or not set(modalities) <= {"text", "audio"}
        or "text" not in modalities
    ):
        raise RequestError(
            400,
            f"'modalities' must be ['text'] or ['text', 'audio'], got {modalities!r}",
            param="modalities",
            code="invalid_value",
        )
    audio = body.get("audio")
    if "audio" not in modalities:
        if audio is not None:
            raise RequestError(
                400,
                "'audio' is only used with modalities ['text', 'audio']",
                param="audio",
                code="invalid_value",
            )
        return False
    _check_audio_output(audio)
    if stream:
        raise RequestError(
            400,
            "spoken answers (modalities with 'audio') are not streamed; set stream to false",
            param="stream",
        )
    return True


def _check_audio_output(audio: Any) -> None:
    """OpenAI's ``audio`` request field: a voice mm has offline, and WAV."""
    from mm.serving.speech_out import VoiceError, check_voice

    if not isinstance(audio, dict):
        raise RequestError(
            400,
            "modalities ['text', 'audio'] need 'audio': {'voice': ..., 'format': 'wav'}",
            param="audio",
            code="invalid_value",
        )
    try:
        check_voice(audio.get("voice"))
    except VoiceError as e:
        raise RequestError(400, f"audio.voice: {e}", param="audio.voice", code="invalid_value") from None
    if audio.get("format") != "wav":
        raise RequestError(
            400,
            f"audio.format must be 'wav', got {audio.get('format')!r}",
            param="audio.format",
            code="invalid_value",
        )


def _number(
    body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{name}' must be a number", param=name, code="invalid_type")
    if not (low < value if low_open else low <= value) or value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(
            400, f"'{name}' must be in {bounds}, got {value}", param=name, code="invalid_value"
        )
    return float(value)


def _int(body: dict, name: str, low: int = -(2**63), high: int = 2**63 - 1) -> int | None:
    """An optional integer field, 400 naming it when it is not an int in ``[low, high]``."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer", param=name, code="invalid_type")
    if not low <= value <= high:
        raise RequestError(
            400, f"'{name}' must be in [{low}, {high}], got {value}", param=name, code="invalid_value"
        )
    return value


# ---------------------------------------------------------------------------------------- media caps
def video_caps(preprocessor, limits: ServerLimits):
    """The model's video settings with the server's byte and pixel limits applied, as for images;
    None when the model takes no video."""
    video = preprocessor.video
    if video is None or preprocessor.image_processor is None:
        return None
    return dataclasses.replace(
        video,
        max_bytes=min(video.max_bytes, limits.max_media_bytes),
        max_pixels_per_frame=min(video.max_pixels_per_frame, limits.max_image_pixels),
    )


def audio_caps(preprocessor, limits: ServerLimits):
    """The model's audio settings with the server's byte limit applied; None when it takes no audio."""
    audio = preprocessor.audio
    if audio is None:
        return None
    cap = limits.max_media_bytes if audio.max_bytes is None else min(audio.max_bytes, limits.max_media_bytes)
    return dataclasses.replace(audio, max_bytes=cap)


def media_policy_for(preprocessor, limits: ServerLimits, allowed_media_domains: Iterable[str] = ()):
    """The :class:`mm.datasets.media.MediaPolicy` of a server: the stricter of the server's limits
    and the model's own settings, URLs only from ``allowed_media_domains``, never a local path."""
    from mm.datasets.media import MediaPolicy

    image_proc = preprocessor.image_processor
    return MediaPolicy(
        allowed_domains=frozenset(allowed_media_domains),
        max_bytes=limits.max_media_bytes,
        timeout_s=limits.media_timeout_s,
        max_image_pixels=min(
            limits.max_image_pixels,
            image_proc.max_image_pixels if image_proc else limits.max_image_pixels,
        ),
        max_images=min(limits.max_images, preprocessor.max_images),
        video=video_caps(preprocessor, limits),
        max_videos=limits.max_videos,
        audio=audio_caps(preprocessor, limits),
        max_audios=limits.max_audios,
        allow_paths=False,
    )


def published_limits(limits: ServerLimits, policy, preprocessor, context_tokens: int) -> dict[str, Any]:
    """The limits ``/health`` publishes: the server's, with those the media policy and the model set."""
    return {
        **asdict(limits),
        "max_images": policy.max_images,
        "max_image_pixels": policy.max_image_pixels,
        "max_videos": policy.max_videos if policy.video is not None else 0,
        "max_video_seconds": policy.video.max_seconds if policy.video is not None else None,
        "max_audios": policy.max_audios if policy.audio is not None else 0,
        "max_audio_seconds": policy.audio.max_seconds if policy.audio is not None else None,
        "max_prompt_tokens": preprocessor.max_seq_len,
        "context_tokens": context_tokens,
        "allowed_media_domains": sorted(policy.allowed_domains),
    }


# ---------------------------------------------------------------------------------------- responses
def token_usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(
    rid: str, model_id: str, message: dict[str, Any], finish_reason: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A ``chat.completion`` object: one choice holding ``message``."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def chunk_event(
    rid: str,
    model_id: str,
    delta: dict[str, Any],
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    choices: bool = True,
) -> str:
    """A ``chat.completion.chunk`` as a server-sent event; ``choices=False`` for the usage chunk."""
    obj = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id}
    obj["choices"] = (
        [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []
    )
    if usage is not None:
        obj["usage"] = usage
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_event(error: RequestError) -> str:
    """An error as a server-sent event (a stream's status line was sent long before)."""
    return f"data: {json.dumps(error.body())}\n\n"
