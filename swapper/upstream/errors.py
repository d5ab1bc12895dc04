"""The single boundary where transport errors become swapper's own.

Both clients' exceptions, :mod:`swapper.upstream.network`'s and httpcore's, are translated into
:class:`~swapper.errors.BackendFailure` and its kinds here and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpcore

from swapper.errors import BackendFailure, BackendTimeout, BackendUnreachable
from swapper.upstream import network

__all__ = ["map_transport_errors"]

#: What either client raises when the transport fails.
_TRANSPORT_ERRORS = (
    network.NetworkFailure,
    httpcore.NetworkError,
    httpcore.TimeoutException,
    httpcore.ProtocolError,
)


@contextlib.contextmanager
def map_transport_errors(model_id: str, *, answered: bool = True) -> Iterator[None]:
    """The single boundary where transport exceptions become swapper's.

    ``answered=False``: no byte of the response has arrived yet, so a broken connection is
    :class:`BackendUnreachable` (the request may be sent again) rather than a broken answer.
    """
    try:
        yield
    except _TRANSPORT_ERRORS as exc:
        raise _translated(model_id, exc, answered) from exc


def _translated(model_id: str, exc: Exception, answered: bool) -> BackendFailure:
    """swapper's error for a transport exception of either client."""
    if isinstance(exc, network.ConnectRefused | httpcore.ConnectError):
        return BackendUnreachable(f"Backend for {model_id!r} refused the connection: {exc}")
    if isinstance(exc, network.ConnectTimedOut | httpcore.ConnectTimeout):
        return BackendTimeout(
            f"Backend for {model_id!r} did not accept a connection in time (timeouts.connect)"
        )
    if isinstance(exc, network.ReadTimedOut | httpcore.TimeoutException):
        return BackendTimeout(f"Backend for {model_id!r} went silent for longer than timeouts.read")
    # A broken connection: the request may be sent again only if no byte of an answer came.
    answered = answered or (isinstance(exc, network.NetworkFailure) and exc.answered)
    failure = BackendFailure if answered else BackendUnreachable
    return failure(f"Backend for {model_id!r} broke the connection: {exc}")
