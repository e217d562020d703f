"""An OpenAI-compatible HTTP server over one `ChatModel`: /v1/chat/completions, /v1/models, /health."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.config import ConfigError

from . import protocol as p
from .chat_model import ChatInputError, ChatModel, ChatStream, Completion, ContextLengthError

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_LIMIT = 1024
DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_PENDING = 64


def create_app(
    chat_model: ChatModel,
    api_key: str | None = None,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pending: int = DEFAULT_MAX_PENDING,
    model_name: str | None = None,
) -> FastAPI:
    """The FastAPI app. Requests wait their turn on the model's lock; more than `max_pending` get 429."""
    name = model_name or chat_model.name
    default_max_tokens = min(max_tokens_limit, chat_model.default_max_new_tokens)
    state = {"pending": 0}
    app = FastAPI(title="chatforge", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_api_key(request, api_key)
        model = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "chatforge"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        _check_api_key(request, api_key)
        payload = p.parse_json(await _read_body(request, max_body_bytes))
        req = p.parse_chat_request(payload, max_tokens_limit)
        if req.model is not None and req.model != name:
            raise p.RequestError(
                404, f"the model '{req.model}' does not exist; this server serves '{name}'",
                param="model", code="model_not_found",
            )  # fmt: skip
        if state["pending"] >= max_pending:
            raise p.RequestError(429, "too many requests are waiting; retry later", type="rate_limit_error")
        gen = req.generation_kwargs(default_max_tokens)
        state["pending"] += 1
        release = _once(partial(_decrement, state))
        try:
            stream = await anyio.to_thread.run_sync(partial(chat_model.stream_chat, req.messages, **gen))
        except BaseException:
            release()
            raise
        if req.stream:
            events = _sse_events(stream, name, req.include_usage, release)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            completion = await anyio.to_thread.run_sync(_drain, stream)
        finally:
            release()
        body = p.completion_body(
            p.completion_id(), name, completion.text, completion.finish_reason,
            completion.prompt_tokens, completion.completion_tokens,
        )  # fmt: skip
        return JSONResponse(body)

    return app


def _decrement(state: dict[str, int]) -> None:
    state["pending"] -= 1


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return call


def _drain(stream: ChatStream) -> Completion:
    try:
        for _ in stream:
            pass
    finally:
        stream.close()
    assert stream.completion is not None
    return stream.completion


async def _sse_events(
    stream: ChatStream, model: str, include_usage: bool, release: Callable[[], None]
) -> AsyncIterator[str]:
    """`chat.completion.chunk` events, then `data: [DONE]`. Generation runs in its own thread, which
    stops at the next token once the client goes away (the generator's `finally` sets `cancel`)."""
    cid, created = p.completion_id(), int(time.time())
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()
    threading.Thread(
        target=_pump, args=(stream, asyncio.get_running_loop(), queue, cancel), daemon=True
    ).start()
    try:
        yield p.sse(p.chunk_body(cid, created, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await queue.get()
            if kind == "delta":
                yield p.sse(p.chunk_body(cid, created, model, {"content": value}))
                continue
            if kind == "error":
                yield p.sse(p.error_body(f"generation failed: {value}", "server_error"))
                break
            yield p.sse(p.chunk_body(cid, created, model, {}, value.finish_reason))
            if include_usage:
                chunk = p.chunk_body(cid, created, model, {})
                chunk["choices"] = []
                chunk["usage"] = p.usage(value.prompt_tokens, value.completion_tokens)
                yield p.sse(chunk)
            break
        yield p.DONE
    finally:
        cancel.set()
        release()


def _pump(
    stream: ChatStream, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, cancel: threading.Event
) -> None:
    """Runs one streamed generation in a worker thread, handing deltas to the event loop."""

    def put(item: tuple[str, Any]) -> None:
        # The loop is gone when the server shuts down mid-stream; the reply has no reader then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, item)

    try:
        for delta in stream:
            if cancel.is_set():
                return
            put(("delta", delta))
        put(("done", stream.completion))
    except Exception as exc:
        log.exception("streamed generation failed")
        put(("error", exc))
    finally:
        stream.close()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) more than `limit` bytes before reading them all."""
    too_large = p.RequestError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guessed key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise p.RequestError(
            401,
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered in OpenAI's {"error": {...}} shape."""

    @app.exception_handler(p.RequestError)
    async def request_error(_: Request, exc: p.RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ChatInputError)
    async def chat_input_error(_: Request, exc: ChatInputError) -> JSONResponse:
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
        return JSONResponse(
            p.error_body(str(exc), "invalid_request_error", "messages", code), status_code=400
        )

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(
            p.error_body(str(exc), "invalid_request_error", None, "invalid_value"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = p.error_body(str(exc.detail), "invalid_request_error", None, code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return JSONResponse(p.error_body("internal server error", "server_error"), status_code=500)
