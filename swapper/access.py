"""Who may call what: API keys, compared in constant time, and the admin scope."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from swapper.errors import Forbidden, Unauthorized

__all__ = ["require_admin", "require_key", "require_metrics_key"]

_MISSING = "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes | None:
    auth = connection.headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode()
    key = connection.headers.get("x-api-key")
    return key.encode() if key else None


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


def require_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: any configured API key (or an admin key) when keys are configured."""
    checked = _checked_key(connection)
    if checked is not None:
        server, key = checked
        if not (_matches(key, server.api_keys) | _matches(key, server.admin_api_keys)):
            raise Unauthorized("Invalid API key")


def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
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


def require_metrics_key(connection: ASGIConnection[Any, Any, Any, Any],
                        handler: BaseRouteHandler) -> None:
    """Guard: ``/metrics`` needs a key only when ``server.metrics_require_key`` says so."""
    if connection.app.state.config.server.metrics_require_key:
        require_key(connection, handler)
