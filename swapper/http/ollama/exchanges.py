"""Opening an exchange for an ``/api/*`` request, and what its backend answers.

The same path as ``/v1``: a lease from the coordinator and an
:class:`~swapper.http.exchange.Exchange`. Ollama reports the time a model took to load, so the
lease is taken first and timed; and a client that hangs up meanwhile cancels the wait (or the
backend's work), as on ``/v1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.datastructures import State
from litestar.types import Scope

from swapper.errors import BackendFailure
from swapper.http.disconnect import client_left_first
from swapper.http.exchange import Exchange, Forward, unless_stopping
from swapper.http.responses import json_response

__all__ = ["ClientLeft", "open_exchange", "unexpected_answer", "upstream_error"]

logger = logging.getLogger("swapper")

_DECODE = msgspec.json.Decoder()


def upstream_error(status: int, content: bytes) -> Response[bytes]:
    """A backend's error answer (OpenAI's shape, or anything) in Ollama's shape."""
    message = content.decode("utf-8", "replace").strip() or f"backend returned HTTP {status}"
    try:
        data = _DECODE.decode(content)
    except msgspec.DecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        message = str(error["message"])
    elif isinstance(error, str):
        message = error
    return json_response({"error": message}, status)


@contextlib.contextmanager
def unexpected_answer(model_id: str) -> Iterator[None]:
    """A backend answer that is not the OpenAI shape it should be: a 502, not a traceback."""
    try:
        yield
    except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BackendFailure(
            f"The backend for {model_id!r} answered in an unexpected shape ({exc!r})"
        ) from None


class ClientLeft(Exception):
    """The client hung up before its answer began; nothing is left to answer."""


async def _lease_and_open(state: State, scope: Scope, forward: Forward) -> tuple[Exchange, int]:
    """An opened exchange for ``forward``, and the ns spent waiting for the model to load."""
    coordinator = state.coordinator
    ticket = None
    load_ns = 0
    if not coordinator.admits_now(forward.model_id):
        started = time.perf_counter_ns()
        await coordinator.preflight(forward.model_id)
        if state.stopping.is_set():
            coordinator.begin_shutdown()  # the enqueue below answers 503
        waiting = coordinator.enqueue(forward.model_id)
        ticket = await unless_stopping(state, coordinator.redeem(waiting))
        load_ns = time.perf_counter_ns() - started
    exchange = Exchange(state, scope, forward, ticket)
    try:
        await exchange.open()
    except BaseException:  # cancelled (the client left) too: give the lease back
        await exchange.close()
        raise
    return exchange, load_ns


async def open_exchange(
    request: Request[Any, Any, State], forward: Forward
) -> tuple[Exchange, int]:
    """:func:`_lease_and_open`, given up (and the backend's work cancelled) if the client hangs
    up while its model loads or its whole answer is generated; then :class:`ClientLeft`."""
    work = asyncio.ensure_future(_lease_and_open(request.app.state, request.scope, forward))
    if await client_left_first(request, work):
        logger.info("client went away; request for %s cancelled", forward.model_id)
        raise ClientLeft
    return work.result()
