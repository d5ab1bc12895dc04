"""Connection hygiene for the HTTP server: limits that hold before any request is authenticated.

uvicorn offers a keep-alive timeout but no deadline for a request head and, with httptools, no
cap on its size: httptools buffers a header value until its end, so a client pushing a 50 MiB
header grows the process by that much, and one trickling a byte a second holds its connection
(and a file descriptor) for ever. :class:`GuardedHttpToolsProtocol` adds both, and a cap on open
connections that refuses a new one at once instead of letting the process run out of
descriptors. It subclasses uvicorn's own protocol, so requests that respect the limits take
exactly uvicorn's path; the checks are a few comparisons per read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import TYPE_CHECKING, Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from swapper.config import ServerSettings

if TYPE_CHECKING:
    from litestar.types import HTTPScope
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    from swapper.http.lean import LeanRoute, _Answer

__all__ = ["GuardedHttpToolsProtocol", "guarded_protocol", "raise_nofile_limit"]

logger = logging.getLogger("swapper")


def raise_nofile_limit() -> int:
    """Lift the soft limit on open files to the hard limit; returns the soft limit now in force.

    Service managers often start processes with a soft limit of 1024 under a far higher hard
    one; every client connection and every backend pipe costs a descriptor.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. RLIM_INFINITY refused: keep what we have
            logger.warning(
                "could not raise the open-files limit from %d to %d: %s", soft, hard, exc
            )
    return soft


def _error_response(status: int, message: str, error_type: str, code: str) -> bytes:
    """A complete HTTP/1.1 response carrying OpenAI error JSON; the connection closes after it."""
    body = json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    ).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size cap and a connection cap."""

    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 4096
    #: Answers plain forwarded requests beneath ASGI (see :mod:`swapper.http.lean`).
    lean: LeanRoute | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The lean route's answer in progress on this connection, told if the client leaves.
        self.lean_answer: _Answer | None = None
        # A head is "pending" from the connection's start, and again after each request message,
        # until the parser reports the headers complete.
        self._head_pending = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            # Refused before reading anything: its descriptor is freed now, not at a timeout.
            self._head_pending = False
            self._reject(
                503,
                f"too many open connections (server.max_connections = "
                f"{self.max_connections}); retry later",
                "server_error",
                "too_many_connections",
            )
            return
        # A connection that never sends a byte is held to the head deadline too.
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
        if self.lean_answer is not None:
            self.lean_answer.client_left()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Each request, pipelined ones too, starts here once its head is parsed.
        lean = self.lean
        if lean is None or not lean.claims(cast("HTTPScope", cycle.scope)):
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(lean.serve(self, cycle, app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def data_received(self, data: bytes) -> None:
        if not self._head_pending:
            super().data_received(data)
            return
        if self._head_timer is None:  # the next head on a kept-alive connection begins
            self._arm_head_timer()
        room = self.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed only what the cap allows: the head must end within it, the rest may be body.
        super().data_received(data[:room])
        if self._head_pending and not self.transport.is_closing():
            self._reject(
                431,
                f"request head larger than server.max_header_bytes ({self.max_header_bytes} bytes)",
                "invalid_request_error",
                "request_header_fields_too_large",
            )
        elif not self.transport.is_closing():
            super().data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_pending = True
        self._head_bytes = 0

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._head_pending:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still being sent: let that response finish.
            self._arm_head_timer()
            return
        if self._head_bytes == 0:
            # Nothing sent at all (an unused pre-opened connection): hang up without an answer
            # that a client could take for the reply to a request it is just sending.
            self.transport.close()
            return
        self._reject(
            408,
            f"request head not received within server.header_timeout ({self.header_timeout:g} s)",
            "invalid_request_error",
            "request_timeout",
        )

    def _reject(self, status: int, message: str, error_type: str, code: str) -> None:
        self._cancel_head_timer()
        self.transport.write(_error_response(status, message, error_type, code))
        self.transport.close()


def guarded_protocol(
    settings: ServerSettings, lean: LeanRoute | None = None
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to hand uvicorn as ``http=``, carrying ``settings``' limits and the
    lean route (None: every request goes to the ASGI app)."""
    limits = {
        "header_timeout": settings.header_timeout,
        "max_header_bytes": settings.max_header_bytes,
        "max_connections": settings.max_connections,
        "lean": lean,
    }
    return cast(
        "type[GuardedHttpToolsProtocol]",
        type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), limits),
    )
