"""Upstream responses whose headers have arrived: the body is read or streamed next."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpcore

from swapper.upstream import network
from swapper.upstream.errors import map_transport_errors

__all__ = ["LeanResponse", "PoolResponse", "UpstreamResponse"]


class UpstreamResponse:
    """An upstream response whose headers have arrived; the body is read or streamed next."""

    __slots__ = ("_model_id", "content_type", "headers", "status")

    def __init__(self, status: int, headers: Sequence[tuple[bytes, bytes]], model_id: str) -> None:
        self.status = status
        self.headers = headers
        self._model_id = model_id
        answered_type = b""
        for name, value in headers:
            if name.lower() == b"content-type":
                answered_type = value
                break
        self.content_type = answered_type.decode("latin-1")

    @property
    def is_stream(self) -> bool:
        """True when the backend answers with server-sent events."""
        return self.content_type.startswith("text/event-stream")

    def header(self, name: bytes) -> bytes | None:
        """The value of the response header ``name`` (lower case), or None."""
        # (Added for swapper/http/peers.py: a peer's Retry-After is passed on to the client.)
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> bytes:
        """The whole body; the response is closed afterwards."""
        raise NotImplementedError

    def iter_bytes(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive. Transport errors raise BackendFailure."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the upstream response (and with it, abort the backend's work if unfinished)."""
        raise NotImplementedError


class LeanResponse(UpstreamResponse):
    """A response on a loopback connection of :mod:`swapper.upstream.network`."""

    __slots__ = ("_connection",)

    def __init__(self, connection: network.Connection, model_id: str) -> None:
        super().__init__(connection.status, connection.headers, model_id)
        self._connection: network.Connection | None = connection

    def _done(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.pool.release(connection)  # kept if complete, else closed

    async def read(self) -> bytes:
        """The whole body; the connection goes back to its pool afterwards."""
        connection = self._connection
        assert connection is not None, "read() of a closed response"
        try:
            if connection.complete:  # the common case: the whole answer came in one read
                chunks = connection.chunks
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                return body
            parts = []
            with map_transport_errors(self._model_id):
                while (chunk := await connection.chunk()) is not None:
                    parts.append(chunk)
            return b"".join(parts)
        finally:
            self._done()

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive. Transport errors raise BackendFailure."""
        connection = self._connection
        assert connection is not None, "iter_bytes() of a closed response"
        with map_transport_errors(self._model_id):
            while (chunk := await connection.chunk()) is not None:
                yield chunk
        self._done()

    async def aclose(self) -> None:
        """Give the connection back: kept if the body was read to its end, else closed."""
        self._done()


class PoolResponse(UpstreamResponse):
    """A response from httpcore's pool (a remote server)."""

    __slots__ = ("_response",)

    def __init__(self, response: httpcore.Response, model_id: str) -> None:
        super().__init__(response.status, response.headers, model_id)
        self._response = response

    async def read(self) -> bytes:
        """The whole body; the response is closed afterwards."""
        try:
            with map_transport_errors(self._model_id):
                return await self._response.aread()
        finally:
            await self._response.aclose()

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive. Transport errors raise BackendFailure."""
        with map_transport_errors(self._model_id):
            async for chunk in self._response.aiter_stream():
                yield chunk

    async def aclose(self) -> None:
        """Close the upstream response (and with it, abort the backend's work if unfinished)."""
        await self._response.aclose()
