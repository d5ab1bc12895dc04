"""Logging: human-readable by default, one JSON object per line on request; request ids.

Each HTTP request gets an id (the client's ``X-Request-Id`` when it is sane, else a new one),
returned in the ``X-Request-Id`` header and attached to every log record made while serving it.
The same middleware writes the access log (one line per request, ``server.access_log``) and
counts ``swapper_requests_total``: it sees every request, so nothing escapes either.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from swapper.http.activity import Usage

__all__ = [
    "REQUEST_ID",
    "note_model",
    "note_started",
    "note_stream_error",
    "note_usage",
    "record_request",
    "request_id_middleware",
    "request_id_of",
    "setup_logging",
]

#: The id of the request being served in this context ("-" outside requests).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_ACCESS = logging.getLogger("swapper.access")
#: Keys of the ASGI scope's ``state`` the endpoints fill in for the access log and metrics.
_MODEL_KEY = "swapper.model"
_STREAM_ERROR_KEY = "swapper.stream_error"
_USAGE_KEY = "swapper.usage"
_STARTED_KEY = "swapper.started"
#: The status label of a stream that began with 200 and ended with an in-stream error event.
STREAM_ERROR = "stream_error"


def note_model(scope: Scope, model_id: str) -> None:
    """Record the model a request resolved to, for its access-log line and metrics."""
    scope.setdefault("state", {})[_MODEL_KEY] = model_id


def note_started(scope: Scope, started: float) -> None:
    """Record when the request began (``time.perf_counter()``), if before the middleware saw it:
    the lean route reads a body before handing the request on."""
    scope.setdefault("state", {})[_STARTED_KEY] = started


def note_stream_error(scope: Scope) -> None:
    """Record that a stream is ending with an error event (counted as such, not as 200)."""
    scope.setdefault("state", {})[_STREAM_ERROR_KEY] = True


def note_usage(scope: Scope, usage: Usage | None) -> None:
    """Record the tokens the backend reported for this answer, for the activity record."""
    if usage is not None:
        scope.setdefault("state", {})[_USAGE_KEY] = usage


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        access = getattr(record, "access", None)
        if access is not None:
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once: ``text`` for people, ``json`` for log shippers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: request id (logs and header), access-log line, request metrics."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        started = (scope.get("state") or {}).get(_STARTED_KEY) or time.perf_counter()
        request_id = request_id_of(scope)
        token = REQUEST_ID.set(request_id)
        header = (b"x-request-id", request_id.encode())
        status = 500  # unless a response starts: the app raised past every handler
        sent = 0
        first: float | None = None  # when the response began (its status and headers)

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent, first
            if message["type"] == "http.response.start":
                status = message["status"]
                first = time.perf_counter()
                message["headers"] = [*message.get("headers", []), header]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            ended = time.perf_counter()
            ttfb = None if first is None else first - started
            owner = scope.get("app")  # the Litestar app (set by it, absent in bare ASGI tests)
            app_state = None if owner is None else owner.state
            record_request(app_state, scope, request_id, status, sent, ended - started, ttfb)
            REQUEST_ID.reset(token)

    return middleware


def request_id_of(scope: Scope) -> str:
    """The request's id: the client's ``X-Request-Id`` when it is sane, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _SANE_ID.match(value):
                return value.decode()
            break
    return secrets.token_hex(8)


def record_request(
    app_state: Any,
    scope: Scope,
    request_id: str,
    status: int,
    sent: int,
    seconds: float,
    ttfb: float | None,
) -> None:
    """Count the request, keep it in the activity history and write its access-log line."""
    state = scope.get("state") or {}
    model = state.get(_MODEL_KEY, "")
    outcome = STREAM_ERROR if state.get(_STREAM_ERROR_KEY) else str(status)
    metrics = getattr(app_state, "metrics", None) if app_state is not None else None
    # The route's template, not the path: unknown paths must not grow the label set.
    endpoint = scope.get("path_template") or "unmatched"
    method = scope.get("method", "-")
    if metrics is not None:
        metrics.requests.labels(model, endpoint, outcome).inc()
    activity = getattr(app_state, "activity", None) if app_state is not None else None
    if activity is not None:
        client = scope.get("client")
        activity.request(
            model=model,
            endpoint=endpoint,
            method=method,
            status=outcome,
            seconds=seconds,
            ttfb=ttfb,
            request_id=request_id,
            client=f"{client[0]}:{client[1]}" if client else None,
            usage=state.get(_USAGE_KEY),
        )
    config = getattr(app_state, "config", None) if app_state is not None else None
    if config is not None and not config.server.access_log:
        return
    path = scope.get("path", "-")
    if _ACCESS.isEnabledFor(logging.INFO):
        _ACCESS.info(
            "%s %s %s model=%s %.3fs %dB id=%s",
            method,
            path,
            outcome,
            model or "-",
            seconds,
            sent,
            request_id,
            extra={
                "access": {
                    "method": method,
                    "path": path,
                    "status": status,
                    "outcome": outcome,
                    "model": model or None,
                    "duration_s": round(seconds, 6),
                    "bytes": sent,
                }
            },
        )
