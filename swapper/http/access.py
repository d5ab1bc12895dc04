"""Who may call what: the Host and Origin check, API keys compared in constant time, and the
admin scope."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
    WebSocketCloseEvent,
)

from swapper.config import ServerSettings, is_loopback
from swapper.errors import Forbidden, Unauthorized

__all__ = [
    "HostOriginGuard",
    "key_accepted",
    "require_admin",
    "require_admin_unless_get",
    "require_key",
    "require_metrics_key",
]

_MISSING = "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes | None:
    auth = connection.headers.get("authorization")
    key = connection.headers.get("x-api-key")
    return _key_of(
        None if auth is None else auth.encode("latin-1"),
        None if key is None else key.encode("latin-1"),
    )


def _key_of(authorization: bytes | None, api_key: bytes | None) -> bytes | None:
    """The key presented: a bearer token, else ``x-api-key``; None if neither."""
    if authorization is not None:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return api_key or None


def key_accepted(
    server: ServerSettings, authorization: bytes | None, api_key: bytes | None
) -> bool:
    """True when :func:`require_key` would let a request with these raw headers through."""
    if not server.api_keys and not server.admin_api_keys:
        return True
    key = _key_of(authorization, api_key)
    return key is not None and (
        _matches(key, server.api_keys) | _matches(key, server.admin_api_keys)
    )


def _matches(candidate: bytes, keys: list[str]) -> bool:
    # Compare with every key, each in constant time, so timing reveals neither key nor position.
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key.encode())
    return found


def _checked_key(connection: ASGIConnection[Any, Any, Any, Any]) -> tuple[Any, bytes] | None:
    """None when no keys are configured (open); else the settings and the key presented."""
    server = connection.app.state.config.server
    if not server.api_keys and not server.admin_api_keys:
        return None
    key = _presented_key(connection)
    if key is None:
        raise Unauthorized(_MISSING)
    return server, key


# The guards are coroutines: Litestar runs a plain function guard in a worker thread, a thread
# hop per request on the hot path (issue 10's profile); these only compare a few bytes.


async def require_key(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler | None
) -> None:
    """Guard: any configured API key (or an admin key) when keys are configured."""
    checked = _checked_key(connection)
    if checked is not None:
        server, key = checked
        if not (_matches(key, server.api_keys) | _matches(key, server.admin_api_keys)):
            raise Unauthorized("Invalid API key")


async def require_admin(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler | None
) -> None:
    """Guard: an admin key for load, unload and reload whenever any keys are configured."""
    checked = _checked_key(connection)
    if checked is None:
        return
    server, key = checked
    if _matches(key, server.admin_api_keys):
        return
    if _matches(key, server.api_keys):
        raise Forbidden("This endpoint needs a key from server.admin_api_keys")
    raise Unauthorized("Invalid API key")


async def require_admin_unless_get(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Guard: reading (GET, HEAD) needs any key, anything else an admin key (``/upstream``: a
    POST there may change the backend's state, e.g. llama-server's ``/slots`` actions)."""
    if connection.scope.get("method") not in ("GET", "HEAD"):
        await require_admin(connection, handler)


async def require_metrics_key(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Guard: ``/metrics`` needs a key only when ``server.metrics_require_key`` says so."""
    if connection.app.state.config.server.metrics_require_key:
        await require_key(connection, handler)


# -- Host and Origin ------------------------------------------------------------------------------

_REFUSED_HEADERS = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]


def _refusal(message: str, code: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return msgspec.json.encode({"error": error})


class HostOriginGuard:
    """ASGI wrapper, outermost: refuse other sites' pages and host names that are not swapper's.

    A web page can make a browser POST to http://127.0.0.1:8890 (a "no-cors" request: the page
    cannot read the reply, but the request runs), and through DNS rebinding it can even read
    replies, under a name of its own that resolves to 127.0.0.1. So, keys or no keys, a request
    whose ``Origin`` is neither swapper's own nor listed in ``server.cors_origins`` is refused,
    and so is one whose ``Host`` is neither a loopback name, nor the address it came in on, nor
    listed in ``server.allowed_hosts``. Clients that send no ``Origin`` (SDKs, curl, servers)
    are untouched. This runs on every request: one pass over the headers and set lookups.
    """

    def __init__(self, app: ASGIApp, server: ServerSettings) -> None:
        self.app = app
        self.any_host = "*" in server.allowed_hosts
        names = {
            "localhost",
            "127.0.0.1",
            "::1",
            server.host.lower(),
            *(host.lower() for host in server.allowed_hosts),
        }
        # A wildcard bind address is no name a client can ask for.
        self.hosts = frozenset(name.encode() for name in names - {"0.0.0.0", "::", ""})
        self.any_origin = "*" in server.cors_origins
        self.origins = frozenset(origin.encode() for origin in server.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer 403 before anything else sees it."""
        if scope["type"] in ("http", "websocket"):
            refused = self._check(scope)
            if refused is not None:
                await self._refuse(scope, send, refused)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> bytes | None:
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        if host is not None and not self.any_host and not self.host_allowed(host, scope):
            shown = host.decode("latin-1")[:200]
            return _refusal(
                f"Host {shown!r} is not allowed: add its name to server.allowed_hosts",
                "host_not_allowed",
            )
        if origin is not None and not self.any_origin and origin not in self.origins:
            own = host is not None and origin == scope["scheme"].encode() + b"://" + host.lower()
            if not own:
                shown = origin.decode("latin-1")[:200]
                return _refusal(
                    f"Origin {shown!r} is not allowed: add it to server.cors_origins "
                    "to let that site's pages use swapper",
                    "origin_not_allowed",
                )
        return None

    def host_allowed(self, host: bytes, scope: Scope) -> bool:
        """Whether a request's ``Host`` header names swapper."""
        # Host is "name", "name:port", "[v6]" or "[v6]:port".
        name = host.lower()
        if not name.endswith(b"]"):
            head, colon, _ = name.rpartition(b":")
            if colon:
                name = head
        if name.startswith(b"["):
            name = name[1:-1]
        if name in self.hosts:
            return True
        local = scope.get("server")
        if local is not None:
            # The address this connection came in on (e.g. the LAN address); a dual-stack
            # socket reports an IPv4 one as ::ffff:a.b.c.d.
            address = str(local[0]).lower().removeprefix("::ffff:").encode()
            if name == address:
                return True
        # The rest of 127.0.0.0/8, written out as an address; rare, so parsed only here.
        return name.startswith(b"127.") and is_loopback(name.decode("latin-1"))

    async def _refuse(self, scope: Scope, send: Send, body: bytes) -> None:
        if scope["type"] == ScopeType.WEBSOCKET:
            close: WebSocketCloseEvent = {"type": "websocket.close", "code": 1008, "reason": ""}
            await send(close)
            return
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 403,
            "headers": [*_REFUSED_HEADERS, (b"content-length", str(len(body)).encode())],
        }
        await send(start)
        end: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": body,
            "more_body": False,
        }
        await send(end)
