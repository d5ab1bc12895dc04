"""Anthropic's error shape, for the ``/v1/messages`` endpoints.

The Anthropic SDK maps the HTTP status to its exception classes and reads
``{"type": "error", "error": {"type", "message"}}``; the ``type`` per status follows
Anthropic's documented table (400 invalid_request_error, 401 authentication_error,
403 permission_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error,
500 api_error, 529 overloaded_error; other 4xx are invalid_request_error).
"""

from __future__ import annotations

from typing import Any

import msgspec

from swapper.http.responses import sse_event

__all__ = [
    "ANTHROPIC_PATHS",
    "anthropic_error",
    "anthropic_error_body",
    "anthropic_error_event",
    "anthropic_error_type",
]

#: Paths whose errors are in Anthropic's shape.
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_DECODE = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()


def anthropic_error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """An error document in Anthropic's shape."""
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def anthropic_error_body(status: int, openai_body: bytes) -> bytes:
    """An error already in OpenAI's shape (see ``normalise_error``), in Anthropic's."""
    message = _DECODE.decode(openai_body)["error"]["message"]
    return _ENCODE.encode(anthropic_error(status, message))


def anthropic_error_event(message: str) -> bytes:
    """An in-stream error event, as Anthropic's API sends one (``event: error``)."""
    return sse_event(anthropic_error(500, message), event="error")
