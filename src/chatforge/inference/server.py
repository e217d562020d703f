"""An OpenAI-compatible HTTP server over one `ChatModel`: /v1/chat/completions, /v1/models, /health.

Requests are decoded in batches by a `BatchScheduler` (one worker thread); the event loop only parses,
hands jobs over and relays their text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge.config import ConfigError

from . import protocol as p
from .chat_model import ChatInputError, ChatModel, Completion, ContextLengthError
from .scheduler import BatchScheduler, PendingReply

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_LIMIT = 1024
DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_PENDING = 64
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.05


class ClientGone(Exception):
    """The client closed the connection before its reply was ready (logged once, answered to no one)."""


def create_app(
    chat_model: ChatModel,
    api_key: str | None = None,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pending: int = DEFAULT_MAX_PENDING,
    model_name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app. Requests are batched (`max_batch_size` rows per decode); more than `max_pending`
    requests in flight get 429; a body not received within `body_timeout_s` seconds gets 408."""
    name = model_name or chat_model.name
    default_max_tokens = min(max_tokens_limit, chat_model.default_max_new_tokens)
    scheduler = BatchScheduler(chat_model, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
    state = {"pending": 0}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await anyio.to_thread.run_sync(scheduler.close)

    app = FastAPI(title="chatforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    _add_error_handlers(app)
    app.add_middleware(_LogFailuresOnce)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_api_key(request, api_key)
        model = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "chatforge"}
        return {"object": "list", "data": [model]}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, float]:
        _check_api_key(request, api_key)
        return {**asdict(scheduler.stats), "in_flight": state["pending"]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        _check_api_key(request, api_key)
        payload = p.parse_json(await _read_body(request, max_body_bytes, body_timeout_s))
        req = p.parse_chat_request(payload, max_tokens_limit)
        if req.model is not None and req.model != name:
            raise p.RequestError(
                404, f"the model '{req.model}' does not exist; this server serves '{name}'",
                param="model", code="model_not_found",
            )  # fmt: skip
        if state["pending"] >= max_pending:
            raise p.RequestError(429, "too many requests are waiting; retry later", type="rate_limit_error")
        state["pending"] += 1
        release = _once(partial(_decrement, state))
        try:
            gen = req.generation_kwargs(default_max_tokens)
            job = await anyio.to_thread.run_sync(partial(chat_model.prepare, req.messages, **gen))
            events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            pending = scheduler.submit(job, _deliver_to(asyncio.get_running_loop(), events))
        except BaseException:
            release()
            raise
        if req.stream:
            body = _sse_events(events, pending, name, req.include_usage, release)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            completion = await _completion_unless_disconnected(request, events, pending)
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


def _deliver_to(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[str, Any], None]:
    """The scheduler's callback (worker thread) -> an item in `events` (event loop)."""

    def deliver(kind: str, value: Any) -> None:
        # The loop is gone when the server shuts down mid-reply; the reply has no reader then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    return deliver


async def _completion(events: asyncio.Queue) -> Completion:
    while True:
        kind, value = await events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise value


async def _completion_unless_disconnected(
    request: Request, events: asyncio.Queue, pending: PendingReply
) -> Completion:
    """The reply; if the client hangs up first, its row is dropped from the batch (ClientGone)."""
    result: list[Completion | Exception] = []

    async def wait_reply(scope: anyio.CancelScope) -> None:
        try:
            result.append(await _completion(events))
        except Exception as exc:  # re-raised below, not wrapped in the task group's ExceptionGroup
            result.append(exc)
        scope.cancel()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait_reply, tasks.cancel_scope)
        # With the body read, the next ASGI message is the disconnect (if it comes before the reply).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tasks.cancel_scope.cancel()
    if not result:
        pending.cancel()
        raise ClientGone("the client disconnected before its reply was ready")
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


async def _sse_events(
    events: asyncio.Queue, pending: PendingReply, model: str, include_usage: bool, release: Callable[[], None]
) -> AsyncIterator[str]:
    """`chat.completion.chunk` events, then `data: [DONE]`. When the client goes away, the generator is
    closed and its `finally` drops the row from its batch at the next token."""
    cid, created = p.completion_id(), int(time.time())
    try:
        yield p.sse(p.chunk_body(cid, created, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield p.sse(p.chunk_body(cid, created, model, {"content": value}))
                continue
            if kind == "error":
                log.error("streamed generation failed: %s", value)
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
        pending.cancel()
        release()


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refusing (413) more than `limit` bytes before reading them all, and (408) a body that has
    not fully arrived within `timeout_s` seconds. A client that hangs up mid-upload raises ClientGone."""
    too_large = p.RequestError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise p.RequestError(
            408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes received)",
            code="request_timeout",
        ) from None  # fmt: skip
    except ClientDisconnect:
        raise ClientGone(f"the client disconnected during the upload ({size} bytes received)") from None
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


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered in OpenAI's {"error": {...}} shape."""

    @app.exception_handler(p.RequestError)
    async def request_error(request: Request, exc: p.RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 408:
            log.warning("%s %s from %s: 408, %s", request.method, request.url.path, _client(request), exc)
            headers = {"Connection": "close"}  # the rest of the body may still be on its way
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        log.warning("%s %s from %s: aborted, %s", request.method, request.url.path, _client(request), exc)
        # Nobody reads this answer; 499 is the de-facto code for "client closed request" in access logs.
        return JSONResponse(p.error_body(str(exc), "invalid_request_error"), status_code=499)

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


class _LogFailuresOnce:
    """Unexpected exceptions: one logged traceback and a 500 in OpenAI's shape.

    Starlette's own 500 path logs through the app's handler and then re-raises to the server, which logs the
    same traceback again; catching here, inside that layer, ends the request without a second log.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_track(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                response = JSONResponse(
                    p.error_body("internal server error", "server_error"), status_code=500
                )
                await response(scope, receive, send)
