"""``mm serve``: an OpenAI-compatible Chat Completions server (FastAPI + uvicorn).

Mainstream servers dropped cross-attention models like this one, so mm serves itself. Endpoints:

* ``POST /v1/chat/completions``: the OpenAI Chat Completions protocol (:mod:`mm.serving.protocol`:
  the parts and fields accepted, spoken answers, the stream's events, the error statuses).
* ``GET /v1/models``: the one model (its id is the folder name, or ``--model-id``).
* ``GET /health``: status, requests in flight and the published limits.
* ``GET /demo``: a page to ask aloud (record or pick a file) and hear the answer (:mod:`mm.serving.web_demo`).

Requests are checked (:mod:`mm.serving.protocol`), admitted, prepared in a thread pool (a small one
without media on the event loop: :data:`INLINE_BYTES`) and decoded in batches by one worker thread
that owns the model (:mod:`mm.serving.engine`); each answer is
returned whole or streamed as server-sent events. The published limits are
:class:`~mm.serving.limits.ServerLimits`.

Heavy modules (torch, FastAPI, uvicorn) are imported on first use, so ``mm --help`` stays fast.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class that
# _add_chat_completions imports locally (string annotations would be resolved in the module globals).

import argparse
import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm.serving.engine import Engine, Job
from mm.serving.limits import ServerLimits
from mm.serving.protocol import (
    DONE_EVENT,
    ChatRequest,
    RequestError,
    chunk_event,
    completion_body,
    error_event,
    media_policy_for,
    parse_chat_request,
    parse_json,
    published_limits,
    read_body,
    token_usage,
)

__all__ = [
    "Engine",
    "RequestError",
    "ServerLimits",
    "create_app",
    "limits_from_args",
    "parse_chat_request",
    "run_serve",
    "serve",
    "server_config",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Served:
    """What the routes of one app read: the model and the settings it is served under."""

    model: Any
    model_id: str
    limits: ServerLimits
    media_policy: Any
    context: int  # the model's context length in tokens
    created: int  # when the app was built (the model card's ``created``)


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
    from fastapi import FastAPI

    if getattr(model, "preprocessor", None) is None:
        raise ValueError("the model has no preprocessor (tokenizer and image settings); cannot serve it")
    limits = limits or ServerLimits()
    if media_policy is None:
        media_policy = media_policy_for(model.preprocessor, limits, allowed_media_domains)
    if media_policy.allow_paths:
        raise ValueError("a server's media policy must not allow local paths")
    served = _Served(
        model=model,
        model_id=model_id,
        limits=limits,
        media_policy=media_policy,
        context=model.config.text.max_seq_len,
        created=int(time.time()),
    )
    app = FastAPI(title="mm", lifespan=_lifespan(served), docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_health(app, served)
    _add_models(app, served)
    _add_demo_page(app, served)
    _add_chat_completions(app, served)
    return app


def _lifespan(served: _Served):
    """The engine lives as long as the app serves: started on startup, closed on shutdown."""

    @asynccontextmanager
    async def lifespan(app):
        app.state.engine = Engine(
            served.model,
            max_batch_size=served.limits.max_batch_size,
            max_concurrent_requests=served.limits.max_concurrent_requests,
            max_join_wait_s=served.limits.max_join_wait_s,
        )
        yield
        app.state.engine.close()

    return lifespan


# ---------------------------------------------------------------------------------------- routes
def _add_error_handlers(app) -> None:
    """Every error leaves as OpenAI's JSON error object: refused requests with their status,
    unknown routes as 404, anything unexpected as 500 (logged, its details kept from the client)."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        headers = {"Connection": "close"} if exc.status == 408 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(_ClientGone)
    async def _client_gone(request, exc: _ClientGone):
        from fastapi.responses import Response

        return Response(status_code=499)  # nobody reads it: the client has left

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


def _add_health(app, served: _Served) -> None:
    """``GET /health``: status, the engine's counts and the published limits."""
    published = published_limits(
        served.limits, served.media_policy, served.model.preprocessor, served.context
    )

    @app.get("/health")
    async def health():
        engine = app.state.engine
        return {
            "status": "ok",
            "model": served.model_id,
            "in_flight": engine.in_flight,
            "waiting": engine.waiting,
            "batches": engine.batches,
            "largest_batch": engine.largest_batch,
            "limits": published,
        }


def _add_models(app, served: _Served) -> None:
    """``GET /v1/models`` and ``GET /v1/models/{id}``: the one model served."""

    def model_card():
        return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "mm"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != served.model_id:
            raise RequestError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return model_card()


def _add_demo_page(app, served: _Served) -> None:
    """``GET /demo``: the page to ask aloud (:mod:`mm.serving.web_demo`)."""

    @app.get("/demo")
    async def demo():
        from fastapi.responses import HTMLResponse

        from mm.serving.web_demo import demo_page

        return HTMLResponse(demo_page(served.model_id))


def _add_chat_completions(app, served: _Served) -> None:
    """``POST /v1/chat/completions``: check, admit, prepare, submit, then answer whole or streamed."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine: Engine = app.state.engine
        with engine.arriving():
            raw = await read_body(request, served.limits.max_request_bytes, served.limits.request_timeout_s)
            small = len(raw) <= INLINE_BYTES
            body = parse_json(raw) if small else await run_in_threadpool(parse_json, raw)
            req = parse_chat_request(body, model_id=served.model_id, limits=served.limits)
            _admit(engine)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        try:
            if small and _text_only(req.messages):
                sample, options = _prepare(served, req)
            else:
                sample, options = await run_in_threadpool(_prepare, served, req)
            job = Job(sample, options, results.put_nowait, loop=loop)
            engine.submit(job)
        except BaseException:
            engine.withdraw()
            raise
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_tokens = len(sample.ids)
        if not req.stream:
            return await _whole_answer(served, req, job, results, rid, prompt_tokens, request)
        return _streamed_answer(served, req, job, results, rid, prompt_tokens)


# ---------------------------------------------------------------------------------------- a chat request
def _admit(engine: Engine) -> None:
    """Take a slot in the engine, or refuse with 429 past ``max_concurrent_requests``."""
    if not engine.try_admit():
        raise RequestError(
            429,
            f"the server is busy: {engine.max_concurrent_requests} requests are in flight, its limit "
            "(max_concurrent_requests); retry later",
            code="too_many_concurrent_requests",
            type="rate_limit_error",
        )


#: Bodies up to this size are parsed on the event loop, and, when they hold no media, tokenised there
#: too: a hop to the thread pool and back costs more than that work (1-3 ms when the server is busy,
#: against 0.01-0.2 ms), and it delays the request's first token and its joining a batch.
INLINE_BYTES = 16 * 1024


def _text_only(messages: list[dict[str, Any]]) -> bool:
    """Whether no message has a part other than text (nothing to fetch or decode)."""
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str) and any(
            not isinstance(part, dict) or part.get("type") != "text" for part in content or ()
        ):
            return False
    return True


def _prepare(served: _Served, req: ChatRequest):
    """Media, prompt and token budget (in a worker thread, or on the event loop for a small request
    without media); ``(sample, options)`` or RequestError."""
    from mm.datasets.media import MediaError
    from mm.model.chat import GenerationOptions, encode_conversation

    try:
        sample = encode_conversation(served.model, req.messages, media_policy=served.media_policy)
    except MediaError as e:
        raise RequestError(400, str(e), param=e.param, code=e.code) from None
    except (ValueError, TypeError, KeyError) as e:  # chat format, prompt length, image data
        raise RequestError(400, str(e), param="messages", code="invalid_messages") from None
    context = served.context
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
        max_new_tokens=min(req.max_tokens or served.limits.max_tokens, room),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop,
    )
    return sample, options


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was complete."""


#: How often a non-streaming request checks that its client is still there while it waits.
_DISCONNECT_POLL_S = 0.25


async def _next_delta_while_connected(results: asyncio.Queue, request, checked: list[float]):
    """:func:`_next_delta`, or :class:`_ClientGone` once the client has disconnected (looked at every
    :data:`_DISCONNECT_POLL_S`, whether deltas keep coming or not; ``checked[0]`` is the last look)."""
    waiting = asyncio.ensure_future(_next_delta(results))
    try:
        while True:
            wait = max(0.0, checked[0] + _DISCONNECT_POLL_S - time.monotonic())
            done, _ = await asyncio.wait({waiting}, timeout=wait)
            if time.monotonic() >= checked[0] + _DISCONNECT_POLL_S:
                checked[0] = time.monotonic()
                if await request.is_disconnected():
                    raise _ClientGone()
            if done:
                return waiting.result()
    finally:
        if not waiting.done():
            waiting.cancel()


async def _next_delta(results: asyncio.Queue):
    """The next :class:`mm.model.chat.Delta` the worker sent; an exception it sent is raised."""
    item = await results.get()
    if isinstance(item, BaseException):
        raise item
    return item


async def _whole_answer(
    served: _Served, req: ChatRequest, job: Job, results: asyncio.Queue, rid: str, prompt_tokens: int, request
) -> dict[str, Any]:
    """The ``chat.completion`` once the answer is complete, spoken too when the request asked.

    A client that hangs up before the answer is complete cancels it: its row leaves the batch at
    the engine's next step and its slot is free again.
    """
    from starlette.concurrency import run_in_threadpool

    texts = []
    checked = [time.monotonic()]
    try:
        while True:
            delta = await _next_delta_while_connected(results, request, checked)
            texts.append(delta.text)
            if delta.finish_reason is not None:
                break
    finally:
        job.cancelled.set()
    message = {"role": "assistant", "content": "".join(texts)}
    if req.speak:
        message["audio"] = await run_in_threadpool(_spoken, message["content"], rid)
    usage = token_usage(prompt_tokens, delta.completion_tokens)
    return completion_body(rid, served.model_id, message, delta.finish_reason, usage)


def _streamed_answer(
    served: _Served, req: ChatRequest, job: Job, results: asyncio.Queue, rid: str, prompt_tokens: int
):
    """The answer as server-sent events, each delta as the worker sends it."""
    from fastapi.responses import StreamingResponse

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices=True) -> str:
        return chunk_event(rid, served.model_id, delta, finish, usage, choices)

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    delta = await _next_delta(results)
                except Exception as e:
                    log.error("request %s failed while streaming: %s", rid, e)
                    yield error_event(
                        RequestError(500, f"internal server error: {type(e).__name__}", type="server_error")
                    )
                    break
                if delta.text:
                    yield chunk({"content": delta.text})
                if delta.finish_reason is not None:
                    yield chunk({}, delta.finish_reason)
                    if req.include_usage:
                        yield chunk(
                            {}, usage=token_usage(prompt_tokens, delta.completion_tokens), choices=False
                        )
                    break
            yield DONE_EVENT
        finally:
            job.cancelled.set()  # the client left, or all was sent: stop decoding this row

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


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
    warm: bool = True,
) -> None:
    """Load the model saved in ``model_dir`` and serve it until interrupted. Before the first
    request, unless ``warm`` is False, it answers a short request of each input the model reads
    (:func:`mm.serving.warmup.warm_up`), so the first client does not pay for what a process
    builds once."""
    import sys

    import uvicorn

    from mm.model.multimodal import MultimodalModel
    from mm.serving.warmup import warm_up

    model = MultimodalModel.from_pretrained(model_dir).eval()
    limits = limits or ServerLimits()
    app = create_app(
        model,
        model_id=model_id or Path(model_dir).resolve().name,
        limits=limits,
        allowed_media_domains=tuple(allowed_media_domains),
    )
    if warm:  # after create_app, which refuses a model it cannot serve

        def failed(kind: str, error: Exception) -> None:
            print(
                f"mm serve: warning: the warm-up request with {kind} failed ({error}); requests with "
                f"{kind} will fail the same way",
                file=sys.stderr,
            )

        took = warm_up(model, on_error=failed)
        if took:
            print(
                "mm serve: warmed up in " + ", ".join(f"{kind} {s:.2f} s" for kind, s in took.items()),
                file=sys.stderr,
            )
    uvicorn.Server(server_config(app, limits, host=host, port=port, log_level=log_level)).run()


def server_config(app, limits: ServerLimits, **options):
    """The uvicorn configuration ``mm serve`` runs with: HTTP/1.1 whose requests must arrive (headers
    and body) within ``limits.request_timeout_s`` (:class:`mm.serving.http.DeadlineH11Protocol`)."""
    import uvicorn

    from mm.serving.http import deadline_protocol

    return uvicorn.Config(app, http=deadline_protocol(limits.request_timeout_s), lifespan="on", **options)


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
        request_timeout_s=args.request_timeout,
        max_join_wait_s=args.max_join_wait,
    )


def run_serve(args: argparse.Namespace) -> int:
    """``mm serve`` (arguments: :mod:`mm.cli`)."""
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
            warm=not args.no_warm_up,
        )
    except (ValueError, OSError) as e:
        print(f"mm serve: {e}", file=sys.stderr)
        return 2
    return 0
