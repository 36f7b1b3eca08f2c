"""``mm serve``: an OpenAI-compatible Chat Completions server (FastAPI + uvicorn).

Mainstream servers dropped cross-attention models like this one, so mm serves itself. Endpoints:

* ``POST /v1/chat/completions``: the OpenAI Chat Completions protocol. Messages hold a string or
  ``text``, ``image_url``, ``video_url`` and ``input_audio`` parts (``data:`` URIs always;
  ``http(s)`` only from hosts named with ``--allow-media-domain``; see :mod:`mm.datasets.media`; a video is
  decoded under the model's video settings with the server's byte and pixel limits, ``max_videos``
  per request; ``input_audio`` is base64 wav or mp3 under the same byte limit, decoded under the
  model's audio settings, ``max_audios`` per request). With ``modalities: ["text", "audio"]`` and
  ``audio: {"voice": "heart", "format": "wav"}`` the message also carries OpenAI's ``audio``
  field: the answer spoken offline by hibari-tts's bundled voice, as base64 WAV (not with
  ``stream``). ``stream: true`` answers with server-sent events
  (``chat.completion.chunk`` objects: the role first, then content deltas, then a chunk with the
  ``finish_reason``, optionally a usage chunk, then ``data: [DONE]``). Supported: ``max_tokens`` /
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n=1``,
  ``stream_options.include_usage``.
* ``GET /v1/models``: the one model (its id is the folder name, or ``--model-id``).
* ``GET /health``: status, requests in flight and the published limits.
* ``GET /demo``: a page to ask aloud (record or pick a file) and hear the answer (:mod:`mm.serving.web_demo`).

**Concurrency.** One worker thread owns the model; the event loop never runs it. Requests are
admitted up to ``max_concurrent_requests`` (counting those being prepared, waiting and decoding;
beyond it: 429), prepared (media fetched and decoded, prompt tokenised) in a thread pool, and put
on a queue. The worker batches dynamically: it takes the oldest waiting request and every other
waiting request with the same sampling settings (greedy requests always share), up to
``max_batch_size``, decodes them together, and streams each row's text to its own request through
its own asyncio queue, so rows never see each other's output. Requests arriving meanwhile form the
next batch. Greedy answers equal those the request gets alone; a seeded sampled request runs alone,
so its answer never depends on its neighbours.

**Errors** are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
requests and passed limits (the message names the limit), 404 for another model id, 413 for a body
over ``max_request_bytes`` (checked from ``Content-Length`` before reading, and counted while
reading), 429 past ``max_concurrent_requests``. A request never makes the server read a local
file, unpickle anything or hold unbounded memory: the body, each image's bytes and pixels, each
video's bytes, frame size, duration and decoded frames, each audio clip's bytes and duration, the
number of images, videos and audio clips, prompt length, new tokens and concurrent requests are all
bounded.

Heavy modules (torch, FastAPI, uvicorn) are imported on first use, so ``mm --help`` stays fast.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class that
# create_app imports locally (string annotations would be resolved in the module globals).

import argparse
import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mm.serving.limits import ServerLimits

__all__ = [
    "Engine",
    "RequestError",
    "ServerLimits",
    "create_app",
    "limits_from_args",
    "parse_chat_request",
    "run_serve",
    "serve",
]

log = logging.getLogger("mm.serving.app")

_MAX_STOP_STRINGS = 4
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs")


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


# ---------------------------------------------------------------------------------------- parsing
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


def _int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise RequestError(400, f"'{name}' must be an integer", param=name, code="invalid_type")
    return value


def parse_chat_request(body: Any, *, model_id: str, limits: ServerLimits) -> ChatRequest:
    """Check a request body against the protocol and the limits (media are checked later).

    Raises:
        RequestError: 400 for a malformed body or a passed limit, 404 for another model.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", code="invalid_body")
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(
            404,
            f"the model {model!r} does not exist; this server serves {model_id!r}",
            param="model",
            code="model_not_found",
        )
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
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stop) > _MAX_STOP_STRINGS:
        raise RequestError(
            400, f"'stop' holds {len(stop)} strings; at most {_MAX_STOP_STRINGS}", param="stop"
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", param="stream")
    speak = _speech_output(body, stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(
        messages=checked,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_int(body, "seed"),
        stop=tuple(stop),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        speak=speak,
    )


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
    if stream:
        raise RequestError(
            400,
            "spoken answers (modalities with 'audio') are not streamed; set stream to false",
            param="stream",
        )
    return True


# ---------------------------------------------------------------------------------------- engine
class _Job:
    """One admitted request on its way through the worker."""

    def __init__(self, sample, options, emit: Callable[[Any], None]) -> None:
        self.sample = sample
        self.options = options
        self.emit = emit
        self.cancelled = threading.Event()
        self.finished = False


class Engine:
    """The worker thread that owns the model, its request queue and the admission count.

    Args:
        model: a :class:`~mm.MultimodalModel` with a preprocessor; only the worker thread runs it.
        max_batch_size: requests decoded together.
        max_concurrent_requests: requests admitted at once (:meth:`try_admit` refuses beyond).
    """

    def __init__(self, model, *, max_batch_size: int = 8, max_concurrent_requests: int = 16) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._model_lock = threading.Lock()  # held while a batch decodes, and by pause()
        self._submitted = 0
        self._started = 0
        self.batches = 0  # batches decoded so far
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="mm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ admission
    def try_admit(self) -> bool:
        """Take a slot for a new request; ``False`` when ``max_concurrent_requests`` are in flight."""
        with self._count_lock:
            if self._in_flight >= self.max_concurrent_requests:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """Give back a slot (the worker does this for every submitted job)."""
        with self._count_lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests queued for the model and not yet decoding."""
        return self._submitted - self._started

    def submit(self, job: _Job) -> None:
        """Queue an admitted job; its slot is released when the worker is done with it."""
        with self._count_lock:
            self._submitted += 1
        self._queue.put(job)

    @contextmanager
    def pause(self):
        """Hold the model: requests are admitted and queued but not decoded until the block ends."""
        with self._model_lock:
            yield

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        pending: deque[_Job] = deque()
        closing = False
        while not closing:
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append(job)
            with self._model_lock:  # (pause() holds it: what arrives meanwhile joins this batch)
                while True:  # everything already waiting may join this batch
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        closing = True
                        break
                    pending.append(job)
                batch = self._take_batch(pending)
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                self._started += len(batch)
                self._run(batch)
        for job in pending:  # shutting down: refuse what never ran
            self._emit(job, RuntimeError("the server is shutting down"))
            self.release()

    def _take_batch(self, pending: deque[_Job]) -> list[_Job]:
        first = pending.popleft()
        key = first.options.batch_key()
        batch, rest = [first], deque()
        while pending:
            job = pending.popleft()
            if len(batch) < self.max_batch_size and job.options.batch_key() == key:
                batch.append(job)
            else:
                rest.append(job)
        pending.extend(rest)
        return batch

    def _emit(self, job: _Job, item: Any) -> None:
        try:
            job.emit(item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            job.cancelled.set()

    def _run(self, batch: list[_Job]) -> None:
        from mm.model.chat import generate_deltas

        live = [job for job in batch if not job.cancelled.is_set()]
        try:
            if live:
                steps = generate_deltas(
                    self.model,
                    [job.sample for job in live],
                    [job.options for job in live],
                    is_cancelled=lambda i: live[i].cancelled.is_set(),
                )
                for step in steps:
                    for row, delta in step:
                        job = live[row]
                        job.finished = delta.finish_reason is not None
                        self._emit(job, delta)
        except Exception as e:  # a fault of the model or the server, not of a request
            log.exception("decoding a batch of %d failed", len(live))
            for job in live:
                if not job.finished:
                    self._emit(job, e)
        finally:
            for _ in batch:
                self.release()


# ---------------------------------------------------------------------------------------- the app
async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (declared or counted) without keeping the excess.

    A refused body is still read and dropped, up to another ``limit`` bytes, so the client can
    finish sending and read the 413 instead of a reset connection.
    """

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


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply", code="invalid_json") from None


def _video_caps(preprocessor, limits: ServerLimits):
    """The model's video settings with the server's byte and pixel limits applied, as for images;
    None when the model takes no video."""
    import dataclasses

    video = preprocessor.video
    if video is None or preprocessor.image_processor is None:
        return None
    return dataclasses.replace(
        video,
        max_bytes=min(video.max_bytes, limits.max_media_bytes),
        max_pixels_per_frame=min(video.max_pixels_per_frame, limits.max_image_pixels),
    )


def _audio_caps(preprocessor, limits: ServerLimits):
    """The model's audio settings with the server's byte limit applied; None when it takes no audio."""
    import dataclasses

    audio = preprocessor.audio
    if audio is None:
        return None
    cap = limits.max_media_bytes if audio.max_bytes is None else min(audio.max_bytes, limits.max_media_bytes)
    return dataclasses.replace(audio, max_bytes=cap)


def create_app(
    model,
    *,
    model_id: str = "mm",
    limits: ServerLimits | None = None,
    allowed_media_domains: tuple[str, ...] | frozenset[str] = (),
    media_policy=None,
):
    """The FastAPI application serving ``model`` (see the module docstring).

    Args:
        model: a :class:`~mm.MultimodalModel` with a preprocessor, in eval mode.
        model_id: the id ``/v1/models`` lists and requests name.
        limits: the published limits.
        allowed_media_domains: hosts whose ``http(s)`` image URLs may be fetched.
        media_policy: a complete :class:`mm.datasets.media.MediaPolicy` instead (tests inject resolvers).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from mm.datasets.media import MediaError, MediaPolicy
    from mm.model.chat import Delta, GenerationOptions, encode_conversation

    if getattr(model, "preprocessor", None) is None:
        raise ValueError("the model has no preprocessor (tokenizer and image settings); cannot serve it")
    limits = limits or ServerLimits()
    image_proc = model.preprocessor.image_processor
    if media_policy is None:
        media_policy = MediaPolicy(
            allowed_domains=frozenset(allowed_media_domains),
            max_bytes=limits.max_media_bytes,
            timeout_s=limits.media_timeout_s,
            max_image_pixels=min(
                limits.max_image_pixels,
                image_proc.max_image_pixels if image_proc else limits.max_image_pixels,
            ),
            max_images=min(limits.max_images, model.preprocessor.max_images),
            video=_video_caps(model.preprocessor, limits),
            max_videos=limits.max_videos,
            audio=_audio_caps(model.preprocessor, limits),
            max_audios=limits.max_audios,
            allow_paths=False,
        )
    if media_policy.allow_paths:
        raise ValueError("a server's media policy must not allow local paths")
    context = model.config.text.max_seq_len
    created = int(time.time())
    published = {
        **asdict(limits),
        "max_images": media_policy.max_images,
        "max_image_pixels": media_policy.max_image_pixels,
        "max_videos": media_policy.max_videos if media_policy.video is not None else 0,
        "max_video_seconds": media_policy.video.max_seconds if media_policy.video is not None else None,
        "max_audios": media_policy.max_audios if media_policy.audio is not None else 0,
        "max_audio_seconds": media_policy.audio.max_seconds if media_policy.audio is not None else None,
        "max_prompt_tokens": model.preprocessor.max_seq_len,
        "context_tokens": context,
        "allowed_media_domains": sorted(media_policy.allowed_domains),
    }

    @asynccontextmanager
    async def lifespan(app):
        app.state.engine = Engine(
            model,
            max_batch_size=limits.max_batch_size,
            max_concurrent_requests=limits.max_concurrent_requests,
        )
        yield
        app.state.engine.close()

    app = FastAPI(title="mm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        err = RequestError(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        )
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        log.exception("unexpected error")
        err = RequestError(500, f"internal server error: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        engine = app.state.engine
        return {
            "status": "ok",
            "model": model_id,
            "in_flight": engine.in_flight,
            "waiting": engine.waiting,
            "batches": engine.batches,
            "largest_batch": engine.largest_batch,
            "limits": published,
        }

    def model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mm"}

    @app.get("/demo")
    async def demo():
        from fastapi.responses import HTMLResponse

        from mm.serving.web_demo import demo_page

        return HTMLResponse(demo_page(model_id))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model_id:
            raise RequestError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return model_card()

    def prepare(req: ChatRequest):
        """In a worker thread: media, prompt and token budget; ``(sample, options)`` or RequestError."""
        try:
            sample = encode_conversation(model, req.messages, media_policy=media_policy)
        except MediaError as e:
            raise RequestError(400, str(e), param=e.param, code=e.code) from None
        except (ValueError, TypeError, KeyError) as e:  # chat format, prompt length, image data
            raise RequestError(400, str(e), param="messages", code="invalid_messages") from None
        room = context - len(sample.ids)
        if req.max_tokens is not None and req.max_tokens > room:
            raise RequestError(
                400,
                f"the prompt has {len(sample.ids)} tokens, so at most {room} new tokens fit the model's "
                f"context of {context} tokens; max_tokens asks for {req.max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        options = GenerationOptions(
            max_new_tokens=min(req.max_tokens or limits.max_tokens, room),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop,
        )
        return sample, options

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await _read_body(request, limits.max_request_bytes)
        body = await run_in_threadpool(_parse_json, raw)
        req = parse_chat_request(body, model_id=model_id, limits=limits)
        engine: Engine = app.state.engine
        if not engine.try_admit():
            raise RequestError(
                429,
                f"the server is busy: {engine.max_concurrent_requests} requests are in flight, its limit "
                "(max_concurrent_requests); retry later",
                code="too_many_concurrent_requests",
                type="rate_limit_error",
            )
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        try:
            sample, options = await run_in_threadpool(prepare, req)
            job = _Job(sample, options, lambda item: loop.call_soon_threadsafe(results.put_nowait, item))
            engine.submit(job)
        except BaseException:
            engine.release()
            raise
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_tokens = len(sample.ids)

        async def next_delta() -> Delta:
            item = await results.get()
            if isinstance(item, BaseException):
                raise item
            return item

        if not req.stream:
            texts = []
            try:
                while True:
                    delta = await next_delta()
                    texts.append(delta.text)
                    if delta.finish_reason is not None:
                        break
            finally:
                job.cancelled.set()
            message = {"role": "assistant", "content": "".join(texts)}
            if req.speak:
                message["audio"] = await run_in_threadpool(_spoken, message["content"], rid)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": delta.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(prompt_tokens, delta.completion_tokens),
            }

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices=True) -> str:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_id,
            }
            obj["choices"] = (
                [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []
            )
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        delta = await next_delta()
                    except Exception as e:
                        log.error("request %s failed while streaming: %s", rid, e)
                        err = RequestError(
                            500, f"internal server error: {type(e).__name__}", type="server_error"
                        )
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    if delta.text:
                        yield chunk({"content": delta.text})
                    if delta.finish_reason is not None:
                        yield chunk({}, delta.finish_reason)
                        if req.include_usage:
                            yield chunk(
                                {}, usage=_usage(prompt_tokens, delta.completion_tokens), choices=False
                            )
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client left, or all was sent: stop decoding this row

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


def _spoken(text: str, rid: str) -> dict[str, Any]:
    """OpenAI's ``message.audio``: the answer said by hibari's bundled voice, as base64 WAV."""
    import base64

    from mm.serving.speech_out import get_synthesizer

    data = get_synthesizer().wav(text, min_seconds=0.1)
    return {
        "id": f"audio_{rid.removeprefix('chatcmpl-')}",
        "data": base64.b64encode(data).decode("ascii"),
        "expires_at": int(time.time()) + 3600,
        "transcript": text,
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------- mm serve
def serve(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    limits: ServerLimits | None = None,
    allowed_media_domains: tuple[str, ...] = (),
    log_level: str = "info",
) -> None:
    """Load the model saved in ``model_dir`` and serve it until interrupted."""
    import uvicorn

    from mm.model.multimodal import MultimodalModel

    model = MultimodalModel.from_pretrained(model_dir).eval()
    app = create_app(
        model,
        model_id=model_id or Path(model_dir).resolve().name,
        limits=limits,
        allowed_media_domains=tuple(allowed_media_domains),
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The :class:`ServerLimits` that ``mm serve``'s flags ask for."""
    return ServerLimits(
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_videos=args.max_videos,
        max_audios=args.max_audios,
        max_request_bytes=args.max_request_bytes,
        max_media_bytes=args.max_media_bytes,
        max_tokens=args.max_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_batch_size=args.max_batch_size,
        media_timeout_s=args.media_timeout,
    )


def run_serve(args: argparse.Namespace) -> int:
    """``mm serve``."""
    import sys

    try:
        limits = limits_from_args(args)
        serve(
            args.model,
            host=args.host,
            port=args.port,
            model_id=args.model_id,
            limits=limits,
            allowed_media_domains=tuple(args.allow_media_domain),
            log_level=args.log_level,
        )
    except (ValueError, OSError) as e:
        print(f"mm serve: {e}", file=sys.stderr)
        return 2
    return 0
