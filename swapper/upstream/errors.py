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

_TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError)


@contextlib.contextmanager
def map_transport_errors(model_id: str, *, answered: bool = True) -> Iterator[None]:
    """The single boundary where transport exceptions become swapper's.

    ``answered=False``: no byte of the response has arrived yet, so a broken connection is
    :class:`BackendUnreachable` (the request may be sent again) rather than a broken answer.
    """
    try:
        yield
    except network.ConnectRefused as exc:
        raise BackendUnreachable(f"Backend for {model_id!r} refused the connection: {exc}") from exc
    except network.ConnectTimedOut as exc:
        raise BackendTimeout(
            f"Backend for {model_id!r} did not accept a connection in time (timeouts.connect)"
        ) from exc
    except network.ReadTimedOut as exc:
        raise BackendTimeout(
            f"Backend for {model_id!r} went silent for longer than timeouts.read"
        ) from exc
    except network.NetworkFailure as exc:
        failure = BackendFailure if answered or exc.answered else BackendUnreachable
        raise failure(f"Backend for {model_id!r} broke the connection: {exc}") from exc
    except httpcore.ConnectError as exc:
        raise BackendUnreachable(f"Backend for {model_id!r} refused the connection: {exc}") from exc
    except httpcore.ConnectTimeout as exc:
        raise BackendTimeout(
            f"Backend for {model_id!r} did not accept a connection in time (timeouts.connect)"
        ) from exc
    except httpcore.TimeoutException as exc:
        raise BackendTimeout(
            f"Backend for {model_id!r} went silent for longer than timeouts.read"
        ) from exc
    except _TRANSPORT_ERRORS as exc:
        failure = BackendFailure if answered else BackendUnreachable
        raise failure(f"Backend for {model_id!r} broke the connection: {exc}") from exc
