"""Forwarding requests to a backend: the hot path.

Backends on loopback (every local one) are reached through :mod:`swapper.upstream.network`, a
lean HTTP/1.1 client on asyncio protocols and httptools: httpcore on anyio cost about 2 ms of
CPU per request on a 2-core machine (issue 10). Remote servers (peers, an OpenAI-compatible
server elsewhere, anything over TLS through a proxy) go through httpx's transport layer
(``httpcore``), which brings TLS, name resolution and proxies. Every transport error of either
is translated into :class:`~swapper.errors.BackendFailure` here and nowhere else, and upstream
error bodies in any of the backends' shapes are normalised to OpenAI's.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, Sequence

import httpcore
import msgspec

from swapper.config import is_loopback
from swapper.upstream import network
from swapper.upstream.errors import map_transport_errors
from swapper.upstream.responses import LeanResponse, PoolResponse, UpstreamResponse

__all__ = ["UpstreamClient", "UpstreamResponse", "normalise_error"]

_JSON = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()


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


#: Connections to one backend when it states no limit of its own.
DEFAULT_MAX_CONNECTIONS = 256
#: Pools kept for backends that may have gone away (a new port each start); oldest closed first.
_MAX_POOLS = 8
#: Idle loopback connections are dropped after this long: llama-server (cpp-httplib) closes
#: its side after 5 s, and a request sent just then would meet a closing connection.
_LOOPBACK_KEEPALIVE = 4.0


class _Target:
    """A base URL, parsed once: where its requests go and how."""

    __slots__ = ("authority", "host", "lean", "port", "prefix")

    def __init__(self, base_url: str) -> None:
        scheme, _, rest = base_url.partition("://")
        authority, slash, prefix = rest.partition("/")
        self.authority = authority.encode()
        self.prefix = (slash + prefix).rstrip("/")
        if authority.startswith("["):  # [v6] or [v6]:port
            host, _, port = authority[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = authority.partition(":")
        self.host = host
        self.port = int(port) if port.isdigit() else (443 if scheme == "https" else 80)
        # The lean client is for plain HTTP on this machine; anything else goes through httpcore.
        self.lean = scheme == "http" and is_loopback(self.host)


def _request_head(method: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, ready to write."""
    lines = [method.encode(), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the backends, one pool per backend.

    Each pool holds at most the connections its backend can serve at once: llama-server parks a
    worker thread on every kept-alive connection, so more connections than threads would leave
    new ones waiting seconds for an idle one to time out. Requests beyond the limit wait here,
    in a FIFO that costs O(1) per request however many wait.
    """

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 600.0) -> None:
        self._pools: collections.OrderedDict[str, httpcore.AsyncConnectionPool] = (
            collections.OrderedDict()
        )
        self._lean: collections.OrderedDict[str, network.Pool] = collections.OrderedDict()
        self._targets: dict[str, _Target] = {}
        #: Pools of gone backends being closed in the background.
        self._closing: set[asyncio.Future[None]] = set()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        # No pool timeout: waiting for a free connection is queueing, bounded by the client.
        self._timeouts = {
            "connect": connect_timeout,
            "read": read_timeout,
            "write": connect_timeout,
            "pool": None,
        }

    def _target(self, base_url: str) -> _Target:
        target = self._targets.get(base_url)
        if target is None:
            if len(self._targets) > 4 * _MAX_POOLS:
                self._targets.clear()
            target = self._targets[base_url] = _Target(base_url)
        return target

    def _lean_pool(
        self, base_url: str, target: _Target, max_connections: int | None
    ) -> network.Pool:
        pool = self._lean.get(base_url)
        if pool is None:
            pool = network.Pool(
                target.host,
                target.port,
                limit=max_connections or DEFAULT_MAX_CONNECTIONS,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                keepalive_expiry=_LOOPBACK_KEEPALIVE,
            )
            self._lean[base_url] = pool
            while len(self._lean) > _MAX_POOLS:
                _, old = self._lean.popitem(last=False)
                old.close()
        elif len(self._lean) > 1:
            self._lean.move_to_end(base_url)
        return pool

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
        """Send ``body`` to ``base_url + path`` and return once the response headers arrive.

        ``method`` and ``headers`` (added to swapper's own) serve the raw ``/upstream``
        passthrough, ``anthropic-version`` and a remote server's ``Authorization``. The
        Content-Type is ``content_type``, else one among ``headers``, else ``application/json``.

        ``keep_alive=False`` asks the backend to close the connection after the response. A
        request that fails on a reused connection before a byte of the answer arrived (the
        backend closed it just as it was reused) is sent once more on a new connection. A
        streamed ``body`` (an upload relayed as it arrives) is sent with ``content_length``
        when known, else chunked.
        """
        target = self._target(base_url)
        if isinstance(body, bytes):
            content_length = len(body)
        sent = [
            (b"Host", target.authority),
            (b"Content-Length", b"%d" % content_length)
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
        if target.lean and method != "HEAD":  # (a HEAD answer's length is no body's)
            head = _request_head(method, (target.prefix + path).encode(), sent)
            lean = self._lean_pool(base_url, target, max_connections)
            with map_transport_errors(model_id, answered=False):
                connection = await _exchange(lean, head, body, content_length is None)
            return LeanResponse(connection, model_id)
        request = httpcore.Request(
            method.encode(),
            base_url + path,
            headers=sent,
            content=body,
            extensions={"timeout": self._timeouts},
        )
        pool = self._pool(base_url, max_connections)
        with map_transport_errors(model_id, answered=False):
            try:
                response = await pool.handle_async_request(request)
            except httpcore.RemoteProtocolError as exc:
                if "without sending a response" not in str(exc):
                    raise
                # A pooled connection the backend had already closed: it never saw the request,
                # so sending it once more, on a new connection, is safe.
                response = await pool.handle_async_request(request)
        return PoolResponse(response, model_id)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        while self._lean:
            _, lean = self._lean.popitem()
            lean.close()
        while self._pools:
            _, pool = self._pools.popitem()
            await pool.aclose()


async def _exchange(
    pool: network.Pool, head: bytes, body: bytes | AsyncIterable[bytes], chunked: bool
) -> network.Connection:
    """Send one request on a connection of ``pool``; the connection once the answer's head is in.

    A reused connection the backend closed just as the request went out (its keep-alive
    timer ran out) fails before any byte of an answer: the backend never processed the
    request, so it is sent once more on a new connection, as browsers and httpx do.
    """
    fresh = False
    while True:
        connection = await pool.acquire(fresh=fresh)
        try:
            await connection.send(head, body, chunked)
            await connection.head()
        except network.ConnectionBroken as exc:
            pool.discard(connection)
            if connection.reused and not exc.answered and not fresh and isinstance(body, bytes):
                fresh = True
                continue
            raise
        except BaseException:
            pool.discard(connection)  # cancelled (the client left) or timed out: abort it
            raise
        return connection
