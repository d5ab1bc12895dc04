"""The exception tree of swapper.

Every error a client can see derives from :class:`SwapperError` and carries the HTTP status,
the OpenAI error ``type`` and ``code`` it is rendered with. One exception handler in the HTTP
layer turns them into OpenAI error JSON; nothing else reaches a client.

    SwapperError
    ├── ConfigError               bad configuration (never reaches HTTP: one line for the operator)
    ├── PluginError               a backend plugin broke the contract
    ├── InvalidRequest            400: malformed body, missing ``model``
    ├── ModelNotFound             404: no such model or alias
    ├── ModelUnavailable          503 + Retry-After: the load failed or timed out
    ├── ServiceUnavailable        503 + Retry-After: shutting down
    └── BackendFailure            502: the backend died or broke the connection
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendFailure",
    "ConfigError",
    "InvalidRequest",
    "ModelNotFound",
    "ModelUnavailable",
    "PluginError",
    "ServiceUnavailable",
    "SwapperError",
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


class PluginError(SwapperError):
    """A backend plugin that broke the plugin contract; the message names the plugin."""


class InvalidRequest(SwapperError):
    """The client's request cannot be routed."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(SwapperError):
    """The requested model is neither a configured id nor an alias."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    param = "model"


class ModelUnavailable(SwapperError):
    """The model could not be made resident (failed or timed-out load)."""

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"
    retry_after = 5


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
