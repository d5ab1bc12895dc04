"""The exception tree of swapper.

Every error a client can see derives from :class:`SwapperError` and carries the HTTP status,
the OpenAI error ``type`` and ``code`` it is rendered with. One exception handler in the HTTP
layer turns them into OpenAI error JSON; nothing else reaches a client.

    SwapperError
    ├── ConfigError               bad configuration: one line for the operator (400 on reload)
    ├── PluginError               a backend plugin broke the contract
    ├── BackendError              a backend could not start, load, unload, sleep or wake a model
    ├── InvalidRequest            400: malformed body, missing ``model``
    │   └── UnsupportedMediaType  415: a Content-Type other than JSON
    ├── ModelNotFound             404: no such model or alias
    ├── Unauthorized              401: no or wrong API key
    ├── Forbidden                 403: a key without the admin scope on an admin endpoint
    ├── QueueFull                 429 + Retry-After: too many requests waiting for models
    ├── ModelUnavailable          503 + Retry-After: the load failed, timed out or backs off
    ├── ServiceUnavailable        503 + Retry-After: shutting down
    └── BackendFailure            502: the backend died or broke the connection
        ├── BackendUnreachable    502: no byte came back (refused, reset): safe to send again
        └── BackendTimeout        504: the backend went silent past timeouts.read
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendError",
    "BackendFailure",
    "BackendTimeout",
    "BackendUnreachable",
    "ConfigError",
    "Forbidden",
    "InvalidRequest",
    "ModelNotFound",
    "ModelUnavailable",
    "PluginError",
    "QueueFull",
    "ServiceUnavailable",
    "SwapperError",
    "Unauthorized",
    "UnsupportedMediaType",
]


class SwapperError(Exception):
    """Root of every error swapper raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After for retryable errors)."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(self.retry_after)}


class ConfigError(SwapperError):
    """A configuration file that cannot be used; the message is one line naming file and key."""

    status_code = 400  # as an answer to POST /admin/reload
    error_type = "invalid_request_error"
    code = "invalid_config"

    def __init__(self, message: str) -> None:
        # Keys and ids come from the file: escape what would break the one line or the terminal.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


class PluginError(SwapperError):
    """A backend plugin that broke the plugin contract; the message names the plugin."""


class BackendError(SwapperError):
    """What a backend plugin raises when it cannot do what was asked (start, load, unload,
    sleep, wake): the message says why, in the backend's own words where it gave any.

    The coordinator records the message as the model's ``last_error`` (a failed load: clients
    then get :class:`ModelUnavailable`), so it is one line or a line and the backend's output.
    """

    status_code = 502
    code = "backend_error"


class InvalidRequest(SwapperError):
    """The client's request cannot be routed."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class UnsupportedMediaType(InvalidRequest):
    """The body is declared as something other than JSON."""

    status_code = 415


class ModelNotFound(SwapperError):
    """The requested model is neither a configured id nor an alias."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    param = "model"


class Unauthorized(SwapperError):
    """No API key, or one that is not configured."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        """Tell the client which scheme to use."""
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(SwapperError):
    """A valid key without the scope the endpoint needs."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "insufficient_scope"


class QueueFull(SwapperError):
    """Too many requests are already waiting for models."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1


class ModelUnavailable(SwapperError):
    """The model could not be made resident (failed or timed-out load, or backing off)."""

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"
    retry_after = 5

    def __init__(
        self, message: str, *, retry_after: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = max(1, retry_after)
        if code is not None:
            self.code = code


class ServiceUnavailable(SwapperError):
    """swapper is shutting down and takes no new work."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"
    retry_after = 5


class BackendFailure(SwapperError):
    """The backend serving the request died or broke the connection."""

    status_code = 502
    error_type = "server_error"
    code = "backend_error"


class BackendUnreachable(BackendFailure):
    """The backend refused or dropped the connection before answering a single byte.

    Nothing was processed, so the request may be sent again once the backend is back.
    """


class BackendTimeout(BackendFailure):
    """The backend said nothing for longer than ``timeouts.read`` (or would not connect)."""

    status_code = 504
    code = "backend_timeout"
