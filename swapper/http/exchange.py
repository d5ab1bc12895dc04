"""One forwarded request: its lease on a model and the backend's response, owned together.

An :class:`Exchange` is made per request. :meth:`Exchange.open` takes a lease and sends the
request (once more after a crash race); :meth:`Exchange.relay` streams the answer; and
:meth:`Exchange.close`, idempotent, gives back whatever the request still holds (its place in
the queue, its lease, the upstream response) wherever the request ends: a normal end, a client
that left, an upstream error, an eviction cut-off, or the stream guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
from litestar import Response
from litestar.datastructures import State
from litestar.types import Scope

from swapper.errors import (
    BackendTimeout,
    BackendUnreachable,
    ModelUnavailable,
    ServiceUnavailable,
    SwapperError,
)
from swapper.http.activity import body_usage, stream_usage
from swapper.http.anthropic import anthropic_error_body, anthropic_error_event
from swapper.http.logs import note_stream_error, note_usage
from swapper.http.rename import ModelRename
from swapper.http.responses import JSON, GuardedStream, error_event
from swapper.http.upload import StreamedUpload, outgoing_body
from swapper.scheduling.coordinator import Lease
from swapper.scheduling.model_state import Waiter
from swapper.upstream.client import UpstreamResponse, normalise_error

__all__ = ["Exchange", "Forward", "unless_stopping"]

logger = logging.getLogger("swapper")

T = TypeVar("T")


class Forward(msgspec.Struct, frozen=True):
    """What one OpenAI request asks for, as routed: sent to ``path`` of ``model_id``'s backend."""

    path: str
    #: A JSON body, or a multipart upload relayed as it arrives.
    body: bytes | StreamedUpload
    model_id: str
    #: The name the body gives: ``model_id`` or one of its aliases.
    requested: str
    stream: bool
    #: The shape of errors: ``openai``, ``anthropic``, or ``raw`` (the backend's, untouched).
    dialect: str = "openai"
    method: str = "POST"
    #: Headers sent to the backend besides swapper's own (``anthropic-version``...); for a raw
    #: passthrough, the client's Content-Type too.
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: False: the body goes to the backend as the client sent it (no rename, no shaping).
    rewrite: bool = True
    #: The answer may be binary (audio): a 200 is relayed as it arrives, whatever its type,
    #: and never renamed.
    binary: bool = False


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


class Exchange:
    """One forwarded request; :meth:`close` releases all it holds, once, however it ends."""

    __slots__ = (
        "_closed",
        "_opening",
        "_rename",
        "_scope",
        "_state",
        "_ticket",
        "_unclosed",
        "content",
        "forward",
        "lease",
        "upstream",
    )

    def __init__(
        self, state: State, scope: Scope, forward: Forward, ticket: Lease | Waiter | None = None
    ) -> None:
        self.forward = forward
        self._state = state
        self._scope = scope
        #: A place in the queue (or a lease) taken before the exchange opened; None: take one.
        self._ticket = ticket
        self.lease: Lease | None = None
        #: The backend's response once its headers arrived.
        self.upstream: UpstreamResponse | None = None
        #: The whole body of an answer that is not a stream; None while streaming.
        self.content: bytes | None = None
        self._unclosed: UpstreamResponse | None = None  # a stream still to be closed
        self._rename: ModelRename | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> asyncio.Future[None]:
        """:meth:`open` in a task of its own, to be raced against a disconnect or a timer;
        :meth:`close` cancels it if it is still running."""
        self._opening = asyncio.ensure_future(self.open())
        return self._opening

    def evicted(self) -> ModelUnavailable | None:
        """The error for a request cut off because its model was evicted past drain_timeout."""
        lease = self.lease
        if lease is None or lease.cut_reason is None:
            return None
        return ModelUnavailable(lease.cut_reason, code="model_evicted")

    async def _take_lease(self) -> Lease:
        """A lease on the model; a request still waiting when shutdown begins gets a 503."""
        state = self._state
        coordinator = state.coordinator
        ticket = self._ticket
        if ticket is None:
            model_id = self.forward.model_id
            await coordinator.preflight(model_id)  # (returns at once for a resident model)
            if state.stopping.is_set():
                coordinator.begin_shutdown()  # the enqueue below answers 503
            ticket = self._ticket = coordinator.enqueue(model_id)
        if isinstance(ticket, Lease):
            lease = ticket  # the hot path: admitted at once, no task to race against shutdown
        else:
            lease = await unless_stopping(state, coordinator.redeem(ticket))
        self._ticket = None
        self.lease = lease
        theirs = lease.upstream_model
        shaping = state.catalog.shaping.get(lease.model_id)
        if not self.forward.rewrite or (theirs is None and shaping is None):
            self._rename = None  # the hot path: the body goes as it came
        else:
            self._rename = ModelRename(lease.model_id, theirs, shaping)
        return lease

    async def open(self) -> None:
        """Lease the model and send the request: headers only for a stream, the body otherwise.

        A backend that refused or dropped the connection before answering a byte never saw the
        request: it is sent once more, after the crash is noticed and the model restarted. On
        an error the lease is still held: the caller closes the exchange.
        """
        state = self._state
        forward = self.forward
        started = time.perf_counter()
        for attempt in (1, 2):
            lease = await self._take_lease()
            rename = self._rename
            try:
                body, content_type, length = outgoing_body(forward.body, rename, forward.requested)
                upstream = self.upstream = await state.upstream.send(
                    forward.model_id,
                    lease.base_url,
                    forward.path,
                    body,
                    max_connections=lease.max_connections,
                    method=forward.method,
                    headers=(*forward.headers, *lease.upstream_headers),
                    content_type=content_type,
                    content_length=length,
                )
                state.metrics.ttfb.labels(forward.model_id).observe(time.perf_counter() - started)
                relayed = upstream.is_stream or forward.binary
                if relayed and upstream.status == 200:
                    self._unclosed = upstream  # the relay streams it; close() ends it
                    return
                content = await upstream.read()  # (closes the response)
            except BackendUnreachable as exc:
                lease.release(used=False)
                evicted = self.evicted()
                if evicted is not None:
                    raise evicted from exc
                if attempt == 2:
                    raise
                logger.warning("%s; sending the request again once it is back", exc.message)
                self.lease = None
                await lease.backend_unreachable()
                continue
            except BackendTimeout:
                lease.backend_silent()
                raise
            except SwapperError as exc:
                evicted = self.evicted()
                if evicted is not None:
                    raise evicted from exc
                raise
            lease.release()  # the whole answer is in: the model may serve another request
            if rename is not None and rename.responses and upstream.status < 400:
                content = rename.response(content)
            self.content = content
            if upstream.status < 400:  # the tokens it reports, for /activity
                note_usage(self._scope, body_usage(content))
            return
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def close(self) -> None:
        """Give back the place in the queue or the lease and close the upstream response;
        cancels an :meth:`open` still running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        opening = self._opening
        if opening is not None and not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await opening
        ticket = self._ticket
        if isinstance(ticket, Lease):
            ticket.release(used=False)  # admitted, but never sent
        elif ticket is not None and not ticket.redeemed:  # its redeem gives it back itself
            self._state.coordinator.abandon(ticket)
        if self.lease is not None:
            self.lease.release()  # (a no-op when the whole answer was read)
        upstream = self._unclosed
        if upstream is not None:
            self._unclosed = None
            await upstream.aclose()

    async def relay(self) -> AsyncIterator[bytes]:
        """Stream the backend's bytes as they arrive; a broken backend ends with an error event.

        The exchange is closed when the stream ends, however it ends.
        """
        scope, lease, upstream = self._scope, self.lease, self._unclosed
        assert lease is not None and upstream is not None, "relay() of an exchange not streaming"
        rename = self._rename
        if rename is not None and not (rename.responses and upstream.is_stream):
            rename = None  # binary answers are never rewritten
        chunks = upstream.iter_bytes()
        # The last two chunks: the final usage / timings event is read from them once the
        # stream ends, for /activity; nothing is parsed while it runs.
        before = last = b""
        try:
            async for chunk in chunks if rename is None else rename.stream(chunks):
                before, last = last, chunk
                yield chunk
            if upstream.is_stream:
                note_usage(scope, stream_usage(before + last))
            evicted = self.evicted()
            if evicted is not None:  # a backend stopped mid-stream may close it as if it were done
                note_stream_error(scope)
                yield self._error_event(evicted.message, evicted.code or "model_evicted")
        except SwapperError as exc:
            exc = self.evicted() or exc  # evicted: say so rather than "broken pipe"
            logger.warning("stream from %s ended early: %s", lease.model_id, exc.message)
            if isinstance(exc, BackendTimeout):
                lease.backend_silent()
            note_stream_error(scope)
            yield self._error_event(exc.message, exc.code or "backend_error")
        finally:
            await self.close()

    def _error_event(self, message: str, code: str) -> bytes:
        """An in-stream error in the client's dialect."""
        if self.forward.dialect == "anthropic":
            return anthropic_error_event(message)
        return error_event(message, code=code)

    def response(self) -> Response[Any]:
        """The answer to send the client, once :meth:`open` returned: a stream (relayed and
        closed as it goes) or the backend's whole body, errors in OpenAI's shape."""
        upstream = self.upstream
        assert upstream is not None, "response() of an exchange not open"
        content = self.content
        if content is None:
            return GuardedStream(
                self.relay(), self.close, status=upstream.status, media_type=upstream.content_type
            )
        dialect = self.forward.dialect
        if upstream.status >= 400 and dialect != "raw":
            error = normalise_error(upstream.status, content)
            if dialect == "anthropic":
                error = anthropic_error_body(upstream.status, error)
            return Response(error, status_code=upstream.status, media_type=JSON)
        return Response(
            content, status_code=upstream.status, media_type=upstream.content_type or JSON
        )
