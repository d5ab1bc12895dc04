"""A lean HTTP/1.1 client for backends on loopback: asyncio protocols and httptools.

httpcore over anyio streams cost about 2 ms of CPU per proxied request on a 2-core machine
(issue 10's profile); this client writes each request in one ``transport.write``, parses the
answer with httptools (C) and hands body chunks over without copying. Per request the work is
O(1): a pool is a stack of idle connections and a FIFO of waiters, never scanned.

Its exceptions (:class:`NetworkFailure` and subclasses) are turned into swapper's own in one
place, :func:`swapper.upstream.errors.map_transport_errors`.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterable
from typing import cast

import httptools

__all__ = [
    "ConnectRefused",
    "ConnectTimedOut",
    "Connection",
    "ConnectionBroken",
    "NetworkFailure",
    "Pool",
    "ReadTimedOut",
]

#: Body bytes buffered from a backend before reading from its socket pauses (backpressure).
_HIGH_WATER = 256 * 1024


class NetworkFailure(Exception):
    """A transport error; ``answered``: some byte of the response had arrived."""

    answered = False


class ConnectRefused(NetworkFailure):
    """The backend refused the connection (or its address could not be reached)."""


class ConnectTimedOut(NetworkFailure):
    """The backend did not accept the connection in time."""


class ReadTimedOut(NetworkFailure):
    """The backend went silent for longer than the read timeout."""


class ConnectionBroken(NetworkFailure):
    """The connection closed or failed mid-exchange, or the answer was not HTTP."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimedOut("read timed out"))


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time, its body chunks queued as they arrive."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        #: Counted in its pool's connections (until discarded).
        self.pooled = True
        #: An exchange completed on it before: a failure before any answer may be a stale one.
        self.reused = False
        self.idle_since = 0.0
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.answered = False
        self.keep_alive = True
        self.error: NetworkFailure | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionBroken(f"invalid HTTP response: {exc}", answered=True))
            self.close()

    def eof_received(self) -> bool | None:
        return False  # close our side too: a half-closed backend connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            if self.head_done and exc is None and self._until_close():
                self.on_message_complete()  # a body without a length ends with the connection
            else:
                reason = str(exc) if exc else "the connection was closed"
                if not self.answered:
                    reason = f"server disconnected without sending a response ({reason})"
                self._fail(ConnectionBroken(reason, answered=self.answered))
        self._wake_writer()
        self.pool.lost(self)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.pool.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self._wake()

    # -- the exchange -------------------------------------------------------------------------

    def _until_close(self) -> bool:
        framed = (b"content-length", b"transfer-encoding")
        return not any(name.lower() in framed for name, _ in self.headers)

    def _fail(self, error: NetworkFailure) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def _wait(self) -> None:
        loop = self.pool.loop
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(self.pool.read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    async def send(self, head: bytes, body: bytes | AsyncIterable[bytes], chunked: bool) -> None:
        """Write the request: head and a bytes body in one write, a streamed body as it comes."""
        self._begin()
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionBroken("the connection was closed before the request", answered=False)
        if isinstance(body, bytes):
            transport.write(head + body)
            return
        transport.write(head)
        async for chunk in body:
            if self.closed:
                break
            if chunked:
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if self._writable is not None:
                await self._drain()
        if self.error is not None:
            raise self.error
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def _drain(self) -> None:
        writable = self._writable
        if writable is None:
            return
        timer = self.pool.loop.call_later(self.pool.connect_timeout, _expire, writable)
        try:
            await writable
        finally:
            timer.cancel()

    async def head(self) -> None:
        """Wait for the response's status and headers."""
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def chunk(self) -> bytes | None:
        """The next body chunk, or None once the body is complete."""
        while True:
            chunks = self.chunks
            if chunks:
                chunk = chunks.popleft()
                self.buffered -= len(chunk)
                if self.paused and self.buffered < _HIGH_WATER // 4 and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            await self._wait()

    def close(self) -> None:
        """Abort the connection (the backend sees it closed and stops its work)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Connections to one backend: at most ``limit`` at once, idle ones reused newest first.

    Requests beyond the limit wait in a FIFO here, so no more waiters than connections ever
    compete for one (httpcore's pool scans every waiter for every connection).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_expiry: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.tls = host, port, tls
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_expiry = keepalive_expiry
        self._idle: list[Connection] = []
        self._count = 0  # connections open or opening, idle or not
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def acquire(self, *, fresh: bool = False) -> Connection:
        """A connection for one exchange: an idle one (unless ``fresh``), else a new one."""
        while True:
            if not fresh:
                now = time.monotonic()
                while self._idle:
                    connection = self._idle.pop()
                    if (
                        not connection.closed
                        and now - connection.idle_since < self.keepalive_expiry
                    ):
                        return connection
                    self.discard(connection)
            if self._count < self.limit:
                self._count += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._count -= 1
                    self._wake_one()
                    raise
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the turn passes on
                raise

    async def _connect(self) -> Connection:
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise ConnectTimedOut("connect timed out") from None
        except OSError as exc:  # refused, unreachable, a TLS failure
            raise ConnectRefused(str(exc) or type(exc).__name__) from None
        return connection

    def release(self, connection: Connection) -> None:
        """Give a connection back after an exchange: kept for reuse if it can be, else closed."""
        if (
            connection.complete
            and connection.keep_alive
            and not connection.closed
            and not self._closed
        ):
            connection.reused = True
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
            self._wake_one()
        else:
            self.discard(connection)

    def discard(self, connection: Connection) -> None:
        """Close a connection and free its place; idempotent."""
        if not connection.pooled:
            return
        connection.pooled = False
        connection.close()
        self._count -= 1
        self._wake_one()

    def lost(self, connection: Connection) -> None:
        """The backend closed ``connection``: an idle one leaves the pool at once."""
        if connection in self._idle:
            self._idle.remove(connection)
            self.discard(connection)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections; those in use close when their exchange ends."""
        self._closed = True
        while self._idle:
            self.discard(self._idle.pop())
