"""Forwarding requests to a backend: the hot path.

Uses httpx's own transport layer (``httpcore``) directly: when it was chosen it added about half
the latency of a full ``httpx.AsyncClient`` (+0.9 ms against +1.4-1.7 ms p50, measured side by
side on a 2-core machine). Every transport error is
translated into :class:`~swapper.errors.BackendFailure` here and nowhere else, and upstream
error bodies in any of the backends' shapes are normalised to OpenAI's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import httpcore
import msgspec

from swapper.errors import BackendFailure, BackendTimeout, BackendUnreachable

__all__ = ["UpstreamClient", "UpstreamResponse", "normalise_error"]

_TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError)
_JSON = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()


@contextlib.contextmanager
def _map_transport_errors(model_id: str, *, answered: bool = True) -> Iterator[None]:
    """The single boundary where httpcore's exceptions become swapper's.

    ``answered=False``: no byte of the response has arrived yet, so a broken connection is
    :class:`BackendUnreachable` (the request may be sent again) rather than a broken answer.
    """
    try:
        yield
    except httpcore.ConnectError as exc:
        raise BackendUnreachable(f"Backend for {model_id!r} refused the connection: {exc}") from exc
    except httpcore.ConnectTimeout as exc:
        raise BackendTimeout(
            f"Backend for {model_id!r} did not accept a connection in time (timeouts.connect)"
        ) from exc
    except httpcore.TimeoutException as exc:
        raise BackendTimeout(
            f"Backend for {model_id!r} went silent for longer than timeouts.read"
        ) from exc
    except _TRANSPORT_ERRORS as exc:
        failure = BackendFailure if answered else BackendUnreachable
        raise failure(f"Backend for {model_id!r} broke the connection: {exc}") from exc


def normalise_error(status: int, body: bytes) -> bytes:
    """An upstream error body in OpenAI's shape ``{"error": {message, type, param, code}}``.

    llama.cpp sends ``{"error": {"code": int, "message", "type"}}``, old vLLM a flat
    ``{"object": "error", "message": ...}``, and anything may send plain text.
    """
    try:
        data = _JSON.decode(body)
    except msgspec.DecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        detail = error
    elif isinstance(data, dict) and isinstance(data.get("message"), str):
        detail = data
    else:
        text = body.decode("utf-8", "replace").strip() or f"upstream returned HTTP {status}"
        detail = {"message": text if not isinstance(error, str) else error}
    kind = detail.get("type")
    if kind not in _OPENAI_TYPES:  # llama.cpp's "not_found_error" and the like
        kind = "invalid_request_error" if status < 500 else "server_error"
    code = detail.get("code")
    param = detail.get("param")
    normalised = {
        "message": str(detail.get("message") or f"upstream returned HTTP {status}"),
        "type": kind,
        "param": param if isinstance(param, str) else None,
        # OpenAI's code is a string or null; llama.cpp repeats the HTTP status as a number.
        "code": code if isinstance(code, str) else None,
    }
    return _ENCODE.encode({"error": normalised})


#: The error types OpenAI's clients know; anything else is mapped by the HTTP status.
_OPENAI_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "rate_limit_error",
        "server_error",
    }
)


@dataclass
class UpstreamResponse:
    """An upstream response whose headers have arrived; the body is read or streamed next."""

    status: int
    content_type: str
    _response: httpcore.Response
    _model_id: str

    @property
    def is_stream(self) -> bool:
        """True when the backend answers with server-sent events."""
        return self.content_type.startswith("text/event-stream")

    async def read(self) -> bytes:
        """The whole body; the response is closed afterwards."""
        try:
            with _map_transport_errors(self._model_id):
                return await self._response.aread()
        finally:
            await self._response.aclose()

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive. Transport errors raise BackendFailure."""
        with _map_transport_errors(self._model_id):
            async for chunk in self._response.aiter_stream():
                yield chunk

    async def aclose(self) -> None:
        """Close the upstream response (and with it, abort the backend's work if unfinished)."""
        await self._response.aclose()


#: Connections to one backend when it states no limit of its own.
DEFAULT_MAX_CONNECTIONS = 256
#: Pools kept for backends that may have gone away (a new port each start); oldest closed first.
_MAX_POOLS = 8


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the backends on loopback, one pool per backend.

    Each pool holds at most the connections its backend can serve at once: llama-server parks a
    worker thread on every kept-alive connection, so more connections than threads would leave
    new ones waiting seconds for an idle one to time out. Requests beyond the limit wait here.
    """

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 600.0) -> None:
        self._pools: collections.OrderedDict[str, httpcore.AsyncConnectionPool] = (
            collections.OrderedDict()
        )
        #: Pools of gone backends being closed in the background.
        self._closing: set[asyncio.Future[None]] = set()
        # No pool timeout: waiting for a free connection is queueing, bounded by the client.
        self._timeouts = {
            "connect": connect_timeout,
            "read": read_timeout,
            "write": connect_timeout,
            "pool": None,
        }

    def _pool(self, base_url: str, max_connections: int | None) -> httpcore.AsyncConnectionPool:
        pool = self._pools.get(base_url)
        if pool is None:
            limit = max_connections or DEFAULT_MAX_CONNECTIONS
            pool = httpcore.AsyncConnectionPool(
                max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=30.0
            )
            self._pools[base_url] = pool
            while len(self._pools) > _MAX_POOLS:
                _, old = self._pools.popitem(last=False)
                closing = asyncio.ensure_future(old.aclose())
                self._closing.add(closing)  # held until done: a bare task may be collected
                closing.add_done_callback(self._closing.discard)
        else:
            self._pools.move_to_end(base_url)
        return pool

    async def send(
        self,
        model_id: str,
        base_url: str,
        path: str,
        body: bytes | AsyncIterable[bytes],
        *,
        keep_alive: bool = True,
        max_connections: int | None = None,
        method: str = "POST",
        headers: Sequence[tuple[bytes, bytes]] = (),
        content_type: bytes | None = None,
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` to ``base_url + path`` and return once the response headers arrive.

        ``method`` and ``headers`` (added to swapper's own) serve the raw ``/upstream``
        passthrough, ``anthropic-version`` and a remote server's ``Authorization``. The
        Content-Type is ``content_type``, else one among ``headers``, else ``application/json``.

        ``keep_alive=False`` asks the backend to close the connection after the response:
        llama-server sometimes drops a kept-alive connection after a stream, and the next
        request sent on it would fail. A streamed ``body`` (an upload relayed as it arrives)
        is sent with ``content_length`` when known, else chunked.
        """
        url = base_url + path
        if isinstance(body, bytes):
            content_length = len(body)
        sent = [
            (b"Host", url.split("/", 3)[2].encode()),
            (b"Content-Length", str(content_length).encode())
            if content_length is not None
            else (b"Transfer-Encoding", b"chunked"),
            (b"Accept", b"*/*"),
            *headers,
        ]
        if content_type is not None:
            sent.append((b"Content-Type", content_type))
        elif not any(name.lower() == b"content-type" for name, _ in headers):
            sent.append((b"Content-Type", b"application/json"))
        if not keep_alive:
            sent.append((b"Connection", b"close"))
        request = httpcore.Request(
            method.encode(), url, headers=sent, content=body, extensions={"timeout": self._timeouts}
        )
        pool = self._pool(base_url, max_connections)
        with _map_transport_errors(model_id, answered=False):
            try:
                response = await pool.handle_async_request(request)
            except httpcore.RemoteProtocolError as exc:
                if "without sending a response" not in str(exc):
                    raise
                # A pooled connection the backend had already closed: it never saw the request,
                # so sending it once more, on a new connection, is safe.
                response = await pool.handle_async_request(request)
        answered_type = b""
        for name, value in response.headers:
            if name.lower() == b"content-type":
                answered_type = value
                break
        return UpstreamResponse(
            response.status, answered_type.decode("latin-1"), response, model_id
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        while self._pools:
            _, pool = self._pools.popitem()
            await pool.aclose()
