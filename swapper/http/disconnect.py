"""A client that hangs up cancels its work: the one race every forwarding route runs.

While the model loads or a whole answer is generated, nothing is sent to the client, so only
the ASGI ``http.disconnect`` message tells that it left. :func:`client_left_first` races the
work against that message and cancels the work when the client wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request
from litestar.datastructures import State

__all__ = ["client_left_first"]


async def _until_disconnect(request: Request[Any, Any, State]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def client_left_first(
    request: Request[Any, Any, State],
    work: asyncio.Future[Any],
    *,
    watch: bool = True,
    stop: Callable[[], Awaitable[None]] | None = None,
) -> bool:
    """Wait for ``work`` or the client's hang-up; True when the client left first.

    The work is then cancelled: by ``stop`` (which must cancel it, e.g. an exchange's close),
    else by cancelling it and waiting for it to end. The same holds when the waiting itself is
    cancelled. ``watch=False`` waits for the work alone (while an upload is relayed, its body
    stream notices a hang-up itself).
    """
    disconnect = asyncio.ensure_future(_until_disconnect(request)) if watch else None
    waits: set[asyncio.Future[Any]] = {work} if disconnect is None else {work, disconnect}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if disconnect is not None:
            disconnect.cancel()
        if not work.done():
            if stop is not None:
                await stop()
            else:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
    return work.cancelled()
