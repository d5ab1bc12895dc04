"""The lean route: plain OpenAI requests for local models, forwarded in raw ASGI.

Litestar's routing, guards, request and response objects cost about as much CPU per request as
the whole exchange with the backend (issue 10's profile). :class:`LeanRoute` sits in front of
Litestar, inside the request-id middleware (request ids, the access log, metrics and the
activity record stay as they are) and the Host/Origin guard, and answers the common case
itself: a POST to a forwarded OpenAI endpoint, with a valid key or none needed, for a local
model. Everything else goes to Litestar untouched, the body already read handed on with it:
bad requests (Litestar words every error), peers' models, streams that wait for a load with
progress feedback, CORS requests and bodies without a length. Once the exchange opens, its
errors are rendered here exactly as :mod:`swapper.http.app` renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from swapper.errors import SwapperError
from swapper.http.access import key_accepted
from swapper.http.exchange import Exchange, Forward
from swapper.http.forwarding import content_type_accepted, route_body
from swapper.http.logs import note_model
from swapper.upstream.client import normalise_error

__all__ = ["LEAN_PATHS", "LeanRoute"]

logger = logging.getLogger("swapper")

#: The endpoints answered here (for local models); each forwards to the same path.
LEAN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_ENCODE = msgspec.json.Encoder()
_JSON = b"application/json"
#: As :data:`swapper.http.responses.SSE_HEADERS`, in ASGI's form.
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class LeanRoute:
    """ASGI wrapper answering plain forwarded OpenAI requests; the rest goes to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the request, or hand it to Litestar."""
        if scope["type"] != ScopeType.HTTP or scope["path"] not in LEAN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        server = state.config.server
        length = content_type = authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
            elif name in (b"origin", b"transfer-encoding"):
                length = None  # CORS and chunked bodies: Litestar's machinery
                break
        if (
            length is None
            or not length.isdigit()
            or int(length) > server.max_request_bytes
            or not key_accepted(server, authorization, api_key)
            or not content_type_accepted(content_type)
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client left while sending it
        forward = _forward(state, scope, body)
        if forward is None:
            await self.app(scope, _replayed(body, receive), send)
            return
        scope["path_template"] = scope["path"]
        await _serve(state, scope, receive, send, forward)


def _forward(state: Any, scope: Scope, body: bytes) -> Forward | None:
    """The request as routed; None for Litestar (an error to word, a peer, load feedback)."""
    try:
        routing = route_body(body)
    except Exception:  # noqa: BLE001 (RecursionError too) Litestar words the error
        return None
    if routing.model not in state.config.names:
        return None  # a peer's model, or none: Litestar's route decides
    try:
        model_id = state.coordinator.resolve(routing.model)
        state.catalog.check_serves(model_id, scope["path"])
    except SwapperError:
        return None
    stream = routing.stream is True
    if (
        stream
        and state.config.swapper.loading_feedback != "none"
        and not state.coordinator.admits_now(model_id)
    ):
        return None  # a stream carrying the loading progress
    note_model(scope, model_id)
    return Forward(scope["path"], body, model_id, routing.model, stream)


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None if the client left while sending it."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replayed(body: bytes, receive: Receive) -> Receive:
    """``receive`` with the body already read given back first."""
    pending: list[ReceiveMessage] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> ReceiveMessage:
        if pending:
            return pending.pop()
        return await receive()

    return replay


class _Client:
    """Whether the client is still there, and whether its answer has begun or ended."""

    __slots__ = ("answering", "done", "left", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.left = self.answering = self.done = False

    async def watch(self, receive: Receive) -> None:
        """Cancel the request's task once the client disconnects (not after its answer)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.done:
            self.left = True
            self.task.cancel()


async def _serve(state: Any, scope: Scope, receive: Receive, send: Send, forward: Forward) -> None:
    """Open the exchange and relay its answer; a client that leaves cancels the work."""
    task = asyncio.current_task()
    assert task is not None
    client = _Client(task)
    watcher = asyncio.ensure_future(client.watch(receive))
    exchange = Exchange(state, scope, forward)
    try:
        try:
            await exchange.open()
            upstream = exchange.upstream
            assert upstream is not None
            content = exchange.content
            client.answering = True
            if content is None:
                await _relay(exchange, upstream.status, upstream.content_type, send)
                return
            if upstream.status >= 400:
                content, media = normalise_error(upstream.status, content), _JSON
            else:
                media = _media(upstream.content_type) if upstream.content_type else _JSON
            await _answer(send, upstream.status, media, content)
        except asyncio.CancelledError:
            if not client.left:
                raise
            task.uncancel()
            if not client.answering:  # (a stream already begun is simply cut short)
                logger.info("client went away; request for %s cancelled", forward.model_id)
                with contextlib.suppress(Exception):
                    await _answer(send, 499, _JSON, b"")
        except SwapperError as exc:
            if client.answering:
                raise  # the answer has begun: nothing more can be said in it
            headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
            await _answer(send, exc.status_code, _JSON, _ENCODE.encode(exc.to_openai()), headers)
        except Exception:
            if client.answering:
                raise
            logger.exception("unhandled error on POST %s", scope["path"])
            error = {
                "message": "Internal server error",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
            await _answer(send, 500, _JSON, _ENCODE.encode({"error": error}))
    finally:
        client.done = True
        watcher.cancel()
        await exchange.close()


def _media(content_type: str) -> bytes:
    # As Litestar writes it: text types with their charset.
    if content_type.startswith("text/") and "charset=" not in content_type:
        content_type += "; charset=utf-8"
    return content_type.encode("latin-1")


async def _relay(exchange: Exchange, status: int, content_type: str, send: Send) -> None:
    """Stream the backend's answer as it arrives; the exchange closes however it ends."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _media(content_type or "text/event-stream")),
                *_STREAM_HEADERS,
            ],
        }
    )
    async for chunk in exchange.relay():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _answer(
    send: Send,
    status: int,
    media: bytes,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole response."""
    sent = [(b"content-type", media), (b"content-length", b"%d" % len(body))]
    if headers:
        sent += headers
    await send({"type": "http.response.start", "status": status, "headers": sent})
    await send({"type": "http.response.body", "body": body, "more_body": False})
