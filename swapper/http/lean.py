"""The lean route: plain OpenAI requests for local models, answered beneath ASGI.

uvicorn's ASGI cycle, Litestar's routing, guards, request and response objects cost about as
much CPU per request as the whole exchange with the backend (issue 10's profiles: an ASGI relay
under uvicorn added twice the latency of the same relay on a bare protocol). :class:`LeanRoute`
is handed each request by :class:`swapper.http.serving.GuardedHttpToolsProtocol` once its head
is parsed, and answers the common case itself, writing to the connection directly: a POST to a
forwarded OpenAI endpoint, with a valid key or none needed, an allowed Host and no Origin, for
a local model. Everything else runs the ASGI app as usual, the body already read handed on with
it: bad requests (Litestar words every error), peers' models, streams that wait for a load with
progress feedback, CORS requests and bodies without a length.

What the ASGI middleware does for every request is done here too, with the same functions:
the request id (header and log records), the access-log line, the request metrics and the
activity record. A client that disconnects cancels the request (the protocol tells the route
when its connection is lost). Once the exchange opens, its errors are rendered exactly as
:mod:`swapper.http.app` renders them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import msgspec
from litestar.types import HTTPScope, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from swapper.errors import ServiceUnavailable, SwapperError
from swapper.http.access import HostOriginGuard, key_accepted
from swapper.http.exchange import Exchange, Forward
from swapper.http.forwarding import content_type_accepted, route_body
from swapper.http.logs import REQUEST_ID, note_model, note_started, record_request, request_id_of
from swapper.http.responses import INTERNAL_ERROR
from swapper.upstream.client import normalise_error

if TYPE_CHECKING:
    from litestar import Litestar
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    from swapper.config import ServerSettings

__all__ = ["LEAN_PATHS", "LeanRoute"]

logger = logging.getLogger("swapper")

#: The endpoints answered here (for local models); each forwards to the same path.
LEAN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_ENCODE = msgspec.json.Encoder()
_JSON = b"application/json"
#: As :data:`swapper.http.responses.SSE_HEADERS`, in wire form.
_STREAM_HEADERS = (
    b"cache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n"
)
_INTERNAL = _ENCODE.encode(INTERNAL_ERROR)


class LeanRoute:
    """Answers plain forwarded OpenAI requests on the connection; the rest goes to ASGI."""

    def __init__(self, app: Litestar, server: ServerSettings) -> None:
        self.state = app.state
        # The Host check of the ASGI app's own guard (built, as that one, from the startup config).
        self.guard = HostOriginGuard(app.asgi_handler, server)

    def claims(self, scope: HTTPScope) -> bool:
        """Whether the head of a request makes it one for this route (the body decides the rest)."""
        if scope["method"] != "POST" or scope["path"] not in LEAN_PATHS:
            return False
        server = self.state.config.server
        length = content_type = authorization = api_key = host = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if length is not None:
                    return False  # a header given twice: the ASGI route decides which counts
                length = value
            elif name == b"content-type":
                if content_type is not None:
                    return False
                content_type = value
            elif name == b"authorization":
                if authorization is not None:
                    return False
                authorization = value
            elif name == b"x-api-key":
                if api_key is not None:
                    return False
                api_key = value
            elif name == b"host":
                if host is not None:
                    return False
                host = value
            elif name in (b"origin", b"transfer-encoding"):
                return False  # CORS and chunked bodies: Litestar's machinery
        guard = self.guard
        return (
            length is not None
            and length.isdigit()
            and int(length) <= server.max_request_bytes
            and (host is None or guard.any_host or guard.host_allowed(host, scope))
            and key_accepted(server, authorization, api_key)
            and content_type_accepted(content_type)
        )

    async def serve(self, protocol: Any, cycle: RequestResponseCycle, app: Any) -> None:
        """Answer one claimed request on ``cycle`` (uvicorn's), or run ``app`` for it."""
        scope = cast("Scope", cycle.scope)
        answer = _Answer(cycle, request_id_of(scope))
        token = REQUEST_ID.set(answer.request_id)
        handed_on = False
        try:
            body = await _read_body(cycle)
            if body is None:
                return  # the client left while sending it (recorded as the ASGI route does)
            forward = self._forward(scope, body)
            if forward is None:
                # The body goes back into the cycle for the ASGI app's first receive(); its
                # middleware records the request, timed from its first byte here.
                handed_on = True
                note_started(scope, answer.started)
                cycle.body, cycle.more_body = body, False  # type: ignore[assignment]
                cycle.message_event.set()
                await cycle.run_asgi(app)
                return
            protocol.lean_answer = answer
            await self._exchange(scope, forward, answer)
        except BaseException as exc:
            # Cancelled at the end of the shutdown grace period (or a defect): as uvicorn does
            # for ASGI, an answer not begun is an error, one begun is cut off.
            answer.abandon(exc)
            raise
        finally:
            protocol.lean_answer = None
            if not handed_on:
                ended = time.perf_counter()
                ttfb = None if answer.began is None else answer.began - answer.started
                seconds = ended - answer.started
                record_request(
                    self.state, scope, answer.request_id, answer.status, answer.sent, seconds, ttfb
                )
            REQUEST_ID.reset(token)

    def _forward(self, scope: Scope, body: bytes) -> Forward | None:
        """The request as routed; None for ASGI (an error to word, a peer, load feedback)."""
        state = self.state
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
        scope["path_template"] = scope["path"]
        note_model(scope, model_id)
        return Forward(scope["path"], body, model_id, routing.model, stream)

    async def _exchange(self, scope: Scope, forward: Forward, answer: _Answer) -> None:
        """Open the exchange and relay its answer; a client that leaves cancels the work."""
        task = asyncio.current_task()
        assert task is not None
        answer.task = task
        exchange = Exchange(self.state, scope, forward)
        try:
            await exchange.open()
            upstream = exchange.upstream
            assert upstream is not None
            content = exchange.content
            if content is None:
                await answer.relay(exchange, upstream.status, upstream.content_type)
                return
            if upstream.status >= 400:
                content, media = normalise_error(upstream.status, content), _JSON
            else:
                media = _media(upstream.content_type) if upstream.content_type else _JSON
            await answer.whole(upstream.status, media, content)
        except asyncio.CancelledError:
            if not answer.left:
                raise
            task.uncancel()
            if not answer.answering:  # (an answer already begun is simply cut short)
                answer.status = 499
                logger.info("client went away; request for %s cancelled", forward.model_id)
        except SwapperError as exc:
            if answer.answering:
                answer.broken("error in a response already begun")
                return
            headers = b"".join(
                b"%s: %s\r\n" % (name.lower().encode(), value.encode())
                for name, value in exc.headers().items()
            )
            await answer.whole(exc.status_code, _JSON, _ENCODE.encode(exc.to_openai()), headers)
        except Exception:
            if answer.answering:
                answer.broken("unhandled error in a response already begun")
                return
            logger.exception("unhandled error on POST %s", scope["path"])
            await answer.whole(500, _JSON, _INTERNAL)
        finally:
            answer.done = True
            await exchange.close()


async def _read_body(cycle: RequestResponseCycle) -> bytes | None:
    """The request body, or None if the client left while sending it."""
    parts: list[bytes] = []
    while True:
        message = await cycle.receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class _Answer:
    """The response to one claimed request, written on uvicorn's cycle as uvicorn would."""

    __slots__ = (
        "began",
        "cycle",
        "done",
        "left",
        "request_id",
        "sent",
        "started",
        "status",
        "task",
    )

    def __init__(self, cycle: RequestResponseCycle, request_id: str) -> None:
        self.cycle = cycle
        self.request_id = request_id
        self.started = time.perf_counter()
        self.began: float | None = None  # when the status and headers went out
        self.status = 500  # unless an answer is written
        self.sent = 0
        self.task: asyncio.Task[Any] | None = None
        self.done = self.left = False

    @property
    def answering(self) -> bool:
        """Whether the answer has begun (its status and headers are written or being written)."""
        return self.began is not None

    def client_left(self) -> None:
        """The connection was lost: cancel the request unless its answer is complete."""
        if not self.done and self.task is not None:
            self.left = True
            self.task.cancel()

    def _head(self, status: int, media: bytes, extra: bytes) -> bytes:
        cycle = self.cycle
        self.status, self.began = status, time.perf_counter()
        cycle.response_started = True
        parts = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"content-type: ", media, b"\r\nx-request-id: ", self.request_id.encode())
        parts += (b"\r\n", extra)
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _write(self, data: bytes) -> bool:
        """Write once the client has taken enough of what was written before (as uvicorn's
        ``send`` waits); False if it is gone."""
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return False
        cycle.transport.write(data)
        return True

    def _framed(self, status: int, media: bytes, body: bytes, headers: bytes = b"") -> bytes:
        """A whole response: head and body."""
        return self._head(status, media, b"content-length: %d\r\n%b" % (len(body), headers)) + body

    async def whole(self, status: int, media: bytes, body: bytes, headers: bytes = b"") -> None:
        """A whole response, in one write."""
        if await self._write(self._framed(status, media, body, headers)):
            self.sent = len(body)
            self._complete()

    async def relay(self, exchange: Exchange, status: int, content_type: str) -> None:
        """Stream the backend's answer as it arrives, chunked; the exchange closes however it ends."""
        head = self._head(status, _media(content_type or "text/event-stream"), _STREAM_HEADERS)
        if not await self._write(head):
            return
        async for chunk in exchange.relay():
            if chunk:
                if not await self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk)):
                    return
                self.sent += len(chunk)
        if await self._write(b"0\r\n\r\n"):
            self._complete()

    def abandon(self, exc: BaseException) -> None:
        """The request's task ends with ``exc``: answer a request not yet answered, cut off one
        whose answer began; the connection closes either way."""
        cycle = self.cycle
        if cycle.disconnected or cycle.response_complete:
            return
        if not self.answering:
            cycle.keep_alive = False
            if isinstance(exc, asyncio.CancelledError):
                error = ServiceUnavailable("swapper is shutting down")
                status, body = error.status_code, _ENCODE.encode(error.to_openai())
            else:
                status, body = 500, _INTERNAL
            cycle.transport.write(self._framed(status, _JSON, body))
            self.sent = len(body)
        cycle.transport.close()

    def broken(self, what: str) -> None:
        """An error after the answer began: nothing more can be said in it; hang up."""
        logger.exception("%s on POST %s", what, self.cycle.scope["path"])
        self.cycle.transport.close()

    def _complete(self) -> None:
        cycle = self.cycle
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()


def _media(content_type: str) -> bytes:
    # As Litestar writes it: text types with their charset.
    if content_type.startswith("text/") and "charset=" not in content_type:
        content_type += "; charset=utf-8"
    return content_type.encode("latin-1")
