"""swapper's HTTP API as the operators' commands speak it: one client, errors as one line.

Transport and HTTP errors become :class:`CommandError` (a message and an exit status), so the
commands in :mod:`swapper.operator_cli` print one ``swapper: ...`` line, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "EXIT_ERROR",
    "EXIT_USAGE",
    "FOLLOW_TIMEOUT",
    "TIMEOUT",
    "WAIT_TIMEOUT",
    "Client",
    "CommandError",
    "model_path",
    "sse_data",
]

EXIT_ERROR = 1
EXIT_USAGE = 2

CONNECT_TIMEOUT = 5.0
TIMEOUT = httpx.Timeout(30.0, connect=CONNECT_TIMEOUT)
# A load or unload waits server-side (model_swap_timeout, draining in-flight requests), so the
# answer may take minutes; swapper bounds it, and Ctrl-C is the operator's way out.
WAIT_TIMEOUT = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
# swapper pings a silent event stream every 15 s: a minute without a byte is a dead link.
FOLLOW_TIMEOUT = httpx.Timeout(60.0, connect=CONNECT_TIMEOUT)


class CommandError(Exception):
    """A failure for the operator: a message for stderr and the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Client:
    """swapper's HTTP API; transport and HTTP errors become :class:`CommandError`."""

    def __init__(self, url: str, key: str | None, key_hint: str) -> None:
        self.url = _check_url(url)
        if key is not None and not key.isascii():
            raise CommandError("the API key must be ASCII", EXIT_USAGE)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._key_hint = key_hint
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def get(
        self, path: str, *, params: dict[str, Any] | None = None, timeout: httpx.Timeout = TIMEOUT
    ) -> Any:
        """GET ``path`` and return its JSON."""
        return self._json(self._send("GET", path, params, timeout), path)

    def post(self, path: str, *, timeout: httpx.Timeout = TIMEOUT) -> Any:
        """POST to ``path`` (no body) and return its JSON."""
        return self._json(self._send("POST", path, None, timeout), path)

    def stream_lines(
        self,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        timeout: httpx.Timeout = FOLLOW_TIMEOUT,
    ) -> Iterator[str]:
        """GET ``path`` as a stream and yield its lines as they arrive."""
        streaming = False
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                streaming = True
                yield from response.iter_lines()
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            if streaming:  # swapper went away mid-stream (a stop, a restart): no protocol talk
                raise CommandError(f"{self.url} closed the stream") from None
            raise self._transport_error(exc) from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None

    def _send(
        self, method: str, path: str, params: dict[str, Any] | None, timeout: httpx.Timeout
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, params=params, timeout=timeout)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        self._check(response)
        return response

    def _json(self, response: httpx.Response, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise CommandError(f"{self.url}{path} did not answer JSON; is this swapper?") from None

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        message = _error_message(response)
        if response.status_code in (401, 403):
            message += f" ({self._key_hint})"
        raise CommandError(message)

    def _transport_error(self, exc: httpx.HTTPError) -> CommandError:
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return CommandError(f"invalid URL {self.url!r}: {exc}", EXIT_USAGE)
        if isinstance(exc, httpx.ConnectTimeout):
            return CommandError(f"cannot reach {self.url}: no answer within {CONNECT_TIMEOUT:g}s")
        if isinstance(exc, httpx.ConnectError):
            return CommandError(f"cannot reach {self.url}: {_reason(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return CommandError(f"{self.url} stopped answering (timed out)")
        return CommandError(f"connection to {self.url} failed: {_reason(exc)}")


def _check_url(url: str) -> str:
    url = url.rstrip("/")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise CommandError(f"invalid URL {url!r}: {exc}", EXIT_USAGE) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CommandError(f"invalid URL {url!r}: expected http://HOST:PORT", EXIT_USAGE)
    return url


def _reason(exc: BaseException) -> str:
    """The innermost OS error's words ("connection refused"), else the exception's own."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI error body, else the HTTP status line."""
    try:
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        if isinstance(message, str) and message.strip():
            return message.strip()
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def model_path(model: str, action: str) -> str:
    return f"/models/{quote(model, safe='')}/{action}"


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event; comments (pings) and other fields are skipped."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
