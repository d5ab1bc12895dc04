"""The OpenAI-compatible endpoints: route by ``model``, relay the backend's bytes.

Handlers stay thin: they find the model named in the body, ask the coordinator for a lease and
relay the backend's answer byte for byte, streams as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Scope, Send

from swapper.access import require_key
from swapper.coordinator import Lease
from swapper.errors import (
    BackendTimeout,
    BackendUnreachable,
    InvalidRequest,
    ModelUnavailable,
    ServiceUnavailable,
    SwapperError,
    UnsupportedMediaType,
)
from swapper.logs import note_model, note_stream_error
from swapper.model_state import Waiter
from swapper.openapi import ChatOperation, CompletionOperation, EmbeddingOperation
from swapper.rename import ModelRename
from swapper.upstream import UpstreamResponse, error_event, normalise_error

__all__ = ["OPENAI_HANDLERS", "SSE_HEADERS", "json_response", "unless_stopping"]

logger = logging.getLogger("swapper")

T = TypeVar("T")
_ENCODE = msgspec.json.Encoder()
_JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response[bytes]:
    """``data`` as a JSON response."""
    return Response(_ENCODE.encode(data), status_code=status, media_type=_JSON, headers=headers)


class _Routing(msgspec.Struct):
    """The only part of a request body swapper reads; everything else passes through untouched."""

    model: str
    stream: Any = None


_ROUTING = msgspec.json.Decoder(_Routing)


def _route(body: bytes) -> _Routing:
    """The ``model`` (and whether a stream is asked for) of a request body, or InvalidRequest."""
    try:
        # Backends choke on invalid UTF-8 anywhere in the body, not only in the fields we read.
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        routing = _ROUTING.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field `model`" in text:
            raise InvalidRequest("You must provide a model parameter", param="model") from None
        if "at `$.model`" in text:
            raise InvalidRequest("`model` must be a string", param="model") from None
        raise InvalidRequest("The request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not routing.model:
        raise InvalidRequest("`model` must not be empty", param="model")
    return routing


# -- forwarding -------------------------------------------------------------------------------


def _evicted(lease: Lease) -> ModelUnavailable | None:
    """The error for a request cut off because its model was evicted past drain_timeout."""
    return None if lease.cut_reason is None else ModelUnavailable(lease.cut_reason,
                                                                  code="model_evicted")


def _rename(lease: Lease) -> ModelRename | None:
    """How model names are rewritten for this backend (None: it takes any name, llama.cpp)."""
    theirs = lease.upstream_model
    return None if theirs is None else ModelRename(lease.model_id, theirs)


async def _relay(scope: Scope, lease: Lease, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    """Stream the backend's bytes as they arrive; a broken backend ends with an error event."""
    rename = _rename(lease)
    if rename is not None and not rename.responses:
        rename = None
    chunks = upstream.iter_bytes()
    try:
        async for chunk in (chunks if rename is None else rename.stream(chunks)):
            yield chunk
        evicted = _evicted(lease)
        if evicted is not None:  # a backend stopped mid-stream may close it as if it were done
            note_stream_error(scope)
            yield error_event(evicted.message, code=evicted.code or "model_evicted")
    except SwapperError as exc:
        exc = _evicted(lease) or exc  # evicted: say so rather than "broken pipe"
        logger.warning("stream from %s ended early: %s", lease.model_id, exc.message)
        if isinstance(exc, BackendTimeout):
            lease.backend_silent()
        note_stream_error(scope)
        yield error_event(exc.message, code=exc.code or "backend_error")
    finally:
        lease.release()
        await upstream.aclose()


class _GuardedStream(Stream):
    """An SSE response whose cleanup runs however the response ends.

    Litestar may cancel a stream before its iterator first runs (the client left at once); the
    generator's own ``finally`` would then never run, so the ASGI call is guarded as well.
    """

    def __init__(self, iterator: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]],
                 *, status: int = 200, media_type: str = "text/event-stream") -> None:
        super().__init__(iterator, status_code=status, media_type=media_type,
                         headers=SSE_HEADERS)
        self.cleanup = cleanup

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:
        inner = super().to_asgi_response(*args, **kwargs)
        cleanup = self.cleanup

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await inner(scope, receive, send)
            finally:
                await cleanup()

        return guarded


def _relay_stream(scope: Scope, lease: Lease, upstream: UpstreamResponse) -> _GuardedStream:
    async def cleanup() -> None:
        lease.release()
        await upstream.aclose()

    return _GuardedStream(_relay(scope, lease, upstream), cleanup, status=upstream.status,
                          media_type=upstream.content_type)


async def unless_stopping(state: State, work: Awaitable[T]) -> T:
    """Await ``work`` (a wait for a model); once shutdown begins, give it up with a 503.

    Requests still waiting for a model then hear "shutting down" at once instead of being cut
    off when the grace period ends; requests a backend is already answering are left alone.
    """
    if state.stopping.is_set():
        state.coordinator.begin_shutdown()
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(state.stopping.wait())
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():  # shutdown began, or this request was cancelled (client left)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        state.coordinator.begin_shutdown()  # every other waiter hears it too
        raise ServiceUnavailable("swapper is shutting down")
    return task.result()


async def _lease(request: Request[Any, Any, State], model_id: str,
                 ticket: Lease | Waiter | None) -> Lease:
    """A lease on ``model_id``; a request still waiting when shutdown begins gets a 503."""
    state = request.app.state
    coordinator = state.coordinator
    if ticket is None:
        await coordinator.preflight(model_id)  # (returns at once for a resident model)
        if state.stopping.is_set():
            coordinator.begin_shutdown()  # the enqueue below answers 503
        ticket = coordinator.enqueue(model_id)
    if isinstance(ticket, Lease):
        return ticket  # the hot path: admitted at once, no task to race against shutdown
    return await unless_stopping(state, coordinator.redeem(ticket))


async def _exchange(request: Request[Any, Any, State], path: str, body: bytes, model_id: str,
                    requested: str, stream: bool, ticket: Lease | Waiter | None = None,
                    ) -> tuple[Lease, UpstreamResponse, bytes | None]:
    """Get a lease and the backend's answer: headers only for a stream, the body otherwise.

    ``requested`` is the name the body gives (an id or an alias of ``model_id``). A backend
    that refused or dropped the connection before answering a byte never saw the request: it
    is sent once more, after the crash is noticed and the model restarted.
    """
    state = request.app.state
    started = time.perf_counter()
    for attempt in (1, 2):
        lease = await _lease(request, model_id, ticket)
        ticket = None
        try:
            sent = body if (rename := _rename(lease)) is None else rename.request(body, requested)
            upstream = await state.upstream.send(model_id, lease.base_url, path, sent,
                                                 keep_alive=not stream,
                                                 max_connections=lease.max_connections)
            state.metrics.ttfb.labels(model_id).observe(time.perf_counter() - started)
            if upstream.is_stream and upstream.status == 200:
                return lease, upstream, None  # the relay releases the lease when the stream ends
            content = await upstream.read()
        except BackendUnreachable as exc:
            lease.release(used=False)
            evicted = _evicted(lease)
            if evicted is not None:
                raise evicted from exc
            if attempt == 2:
                raise
            logger.warning("%s; sending the request again once it is back", exc.message)
            await lease.backend_unreachable()
            continue
        except BackendTimeout:
            lease.backend_silent()
            lease.release()
            raise
        except SwapperError as exc:
            lease.release()
            evicted = _evicted(lease)
            if evicted is not None:
                raise evicted from exc
            raise
        except BaseException:
            lease.release()
            raise
        lease.release()
        if rename is not None and rename.responses and upstream.status < 400:
            content = rename.response(content)
        return lease, upstream, content
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


async def _until_disconnect(request: Request[Any, Any, State]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_content_type(request: Request[Any, Any, State]) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # curl -d without -H, and other lax clients: the body is parsed as JSON anyway
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media!r}",
                                   code="unsupported_media_type")


async def _forward(request: Request[Any, Any, State], path: str) -> Response[Any]:
    """Route one OpenAI request to its model's backend and relay the answer."""
    state = request.app.state
    _check_content_type(request)
    body = await request.body()
    routing = _route(body)
    model_id = state.coordinator.resolve(routing.model)
    note_model(request.scope, model_id)
    stream = routing.stream is True
    feedback = state.config.swapper.loading_feedback
    if stream and feedback != "none" and not state.coordinator.admits_now(model_id):
        # Check and queue now, so that a model that cannot start, a full queue or a
        # backing-off model is still a 503/429; only then commit to a 200 whose stream
        # carries the loading progress.
        await state.coordinator.preflight(model_id)
        if state.stopping.is_set():
            state.coordinator.begin_shutdown()  # the enqueue below answers 503
        ticket = state.coordinator.enqueue(model_id)
        mode = feedback if path == "/v1/chat/completions" else "comments"
        return _loading_stream(request, path, body, model_id, routing.model, mode, ticket)
    return await _forward_now(request, path, body, model_id, routing.model, stream)


async def _forward_now(request: Request[Any, Any, State], path: str, body: bytes, model_id: str,
                       requested: str, stream: bool) -> Response[Any]:
    # A client that goes away while its model loads or its answer is generated cancels the
    # upstream work: race the exchange against the ASGI disconnect message.
    exchange = asyncio.ensure_future(_exchange(request, path, body, model_id, requested, stream))
    disconnect = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((exchange, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not exchange.done():
            exchange.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await exchange
    if exchange.cancelled():
        logger.info("client went away; request for %s cancelled", model_id)
        return Response(b"", status_code=499)
    lease, upstream, content = exchange.result()
    if content is None:
        return _relay_stream(request.scope, lease, upstream)
    if upstream.status >= 400:
        content = normalise_error(upstream.status, content)
        return Response(content, status_code=upstream.status, media_type=_JSON)
    return Response(content, status_code=upstream.status, media_type=upstream.content_type or _JSON)


def _progress(mode: str, model_id: str, elapsed: float) -> bytes:
    """One loading-progress event: an SSE comment, or a reasoning delta Open WebUI shows."""
    if mode == "comments":
        return f": loading {model_id} {elapsed:.1f}s\n\n".encode()
    chunk = {"id": "swapper-loading", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model_id, "choices": [{"index": 0, "finish_reason": None, "delta": {
                 "role": "assistant", "reasoning_content": f"Loading {model_id}… {elapsed:.0f}s\n"}}]}
    return b"data: " + _ENCODE.encode(chunk) + b"\n\n"


def _loading_stream(request: Request[Any, Any, State], path: str, body: bytes, model_id: str,
                    requested: str, mode: str, ticket: Lease | Waiter) -> _GuardedStream:
    coordinator = request.app.state.coordinator

    async def cleanup() -> None:
        if isinstance(ticket, Lease):
            ticket.release(used=False)  # no-op when the relay already released it
        elif not ticket.redeemed:  # the stream never started: give the place back
            coordinator.abandon(ticket)

    return _GuardedStream(
        _loading_then_relay(request, path, body, model_id, requested, mode, ticket), cleanup)


async def _loading_then_relay(request: Request[Any, Any, State], path: str, body: bytes,
                              model_id: str, requested: str, mode: str,
                              ticket: Lease | Waiter) -> AsyncIterator[bytes]:
    """A stream that must wait for its model: progress every few seconds, then the answer.

    The 200 and the SSE headers go out at once, so the client's read timeout is reset by
    each progress event; a load that fails ends the stream with an error event.
    """
    interval = request.app.state.config.swapper.loading_feedback_interval
    started = time.perf_counter()
    exchange = asyncio.ensure_future(
        _exchange(request, path, body, model_id, requested, True, ticket))
    relay: AsyncIterator[bytes] | None = None
    try:
        while not (await asyncio.wait({exchange}, timeout=interval))[0]:
            yield _progress(mode, model_id, time.perf_counter() - started)
        try:
            lease, upstream, content = exchange.result()
        except SwapperError as exc:
            note_stream_error(request.scope)
            yield error_event(exc.message, code=exc.code or "backend_error",
                              type=exc.error_type)
            return
        if content is not None:  # the backend refused the request itself (an error JSON)
            error = msgspec.json.decode(normalise_error(upstream.status, content))["error"]
            note_stream_error(request.scope)
            yield error_event(error["message"], code=error["code"], type=error["type"])
            return
        relay = _relay(request.scope, lease, upstream)
        async for chunk in relay:
            yield chunk
    finally:
        if relay is not None:
            await relay.aclose()  # type: ignore[attr-defined]
        elif not exchange.done():
            exchange.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await exchange
        elif not exchange.cancelled() and exchange.exception() is None:
            lease, upstream, content = exchange.result()
            if content is None:  # answered, but the client left before the relay began
                lease.release()
                await upstream.aclose()


# -- OpenAI endpoints ---------------------------------------------------------------------------


@post("/v1/chat/completions", guards=[require_key], operation_class=ChatOperation,
      status_code=200)
async def chat_completions(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI chat completions, routed by the body's ``model``; streams pass through as SSE."""
    return await _forward(request, "/v1/chat/completions")


@post("/v1/completions", guards=[require_key], operation_class=CompletionOperation,
      status_code=200)
async def completions(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI legacy completions, routed by the body's ``model``."""
    return await _forward(request, "/v1/completions")


@post("/v1/embeddings", guards=[require_key], operation_class=EmbeddingOperation,
      status_code=200)
async def embeddings(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI embeddings, routed by the body's ``model``."""
    return await _forward(request, "/v1/embeddings")


@get("/v1/models", guards=[require_key])
async def list_models(state: State) -> Response[bytes]:
    """Every configured model, loaded or not; never triggers a load."""
    return Response(state.models_document, media_type=_JSON)


OPENAI_HANDLERS = [chat_completions, completions, embeddings, list_models]
