"""What swapper sends back, in one place: JSON responses, SSE events and the SSE response.

Every server-sent event swapper writes itself (an in-stream error, loading progress, the
``/events`` and log streams) is framed by :func:`sse_event` or :func:`sse_comment`; the bytes
a backend streams are relayed as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from litestar import Response
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "INTERNAL_ERROR",
    "JSON",
    "SSE",
    "SSE_HEADERS",
    "GuardedStream",
    "error_event",
    "json_response",
    "sse_comment",
    "sse_event",
]

_ENCODE = msgspec.json.Encoder()
JSON = "application/json"
SSE = "text/event-stream"
#: Headers of every SSE response: no caching, and no buffering by a proxy (nginx) in front.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: The answer to an unexpected failure (its details go to the log, never to the client).
INTERNAL_ERROR = {
    "error": {
        "message": "Internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    """``data`` as a JSON response."""
    return Response(_ENCODE.encode(data), status_code=status, media_type=JSON, headers=headers)


def sse_event(data: Any, event: str | None = None) -> bytes:
    """One server-sent event carrying ``data`` as JSON, with an ``event:`` line if named."""
    frame = b"data: " + _ENCODE.encode(data) + b"\n\n"
    return frame if event is None else b"event: " + event.encode() + b"\n" + frame


def sse_comment(text: str) -> bytes:
    """An SSE comment: clients ignore it, but it resets their read timeout (and proxies')."""
    return f": {text}\n\n".encode()


def error_event(
    message: str, *, code: str | None = "backend_error", kind: str = "server_error"
) -> bytes:
    """An in-stream SSE error event (``kind`` is its OpenAI ``type``); the OpenAI SDK raises
    APIError on it."""
    return sse_event({"error": {"message": message, "type": kind, "param": None, "code": code}})


class GuardedStream(Stream):
    """An SSE response whose cleanup runs however the response ends.

    Litestar may cancel a stream before its iterator first runs (the client left at once); the
    generator's own ``finally`` would then never run, so the ASGI call is guarded as well.
    """

    def __init__(
        self,
        iterator: AsyncIterator[bytes],
        cleanup: Callable[[], Awaitable[None]],
        *,
        status: int = 200,
        media_type: str = SSE,
    ) -> None:
        super().__init__(iterator, status_code=status, media_type=media_type, headers=SSE_HEADERS)
        self.cleanup = cleanup

    # Litestar's signature lists every keyword it may pass; all of them go straight through.
    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        inner = super().to_asgi_response(*args, **kwargs)
        cleanup = self.cleanup

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await inner(scope, receive, send)
            finally:
                await cleanup()

        return guarded
