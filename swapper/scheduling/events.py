"""The coordinator's events, fanned out to listeners (metrics) and subscribers (``/events``).

Event types and their data:

* ``status``: ``model, status, previous, pid, last_error, time`` — every state change;
* ``swap``: ``from, to, reason, seconds, time`` — a model became resident; ``seconds`` runs
  from the start of the swap (the unload of ``from``, if any) to ready; ``reason`` is one of
  request, manual, crashed, reload;
* ``loaded``: ``model, seconds`` — how long the backend took from start to ready;
* ``unloaded``: ``model, seconds`` — how long stopping it took;
* ``queue``: ``model, queued, in_flight`` — sent only while someone subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STOPPED", "Event", "EventBus", "next_event"]


@dataclass(frozen=True)
class Event:
    """One thing that happened, with a wall-clock time."""

    type: str
    data: dict[str, Any]
    time: float = field(default_factory=time.time)


class EventBus:
    """Synchronous listeners see every event; async subscribers get a bounded queue each."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._listeners: list[Callable[[Event], None]] = []
        self._queues: set[asyncio.Queue[Event]] = set()
        self._queue_size = queue_size

    @property
    def subscribed(self) -> bool:
        """True while an ``/events`` client listens (chatty events are sent only then)."""
        return bool(self._queues)

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` synchronously for every event."""
        self._listeners.append(listener)

    def emit(self, type_: str, **data: Any) -> None:
        """Publish an event to every listener and subscriber."""
        event = Event(type_, data)
        for listener in self._listeners:
            listener(event)
        for queue in self._queues:
            if queue.full():  # a slow subscriber loses its oldest events, never blocks us
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event]]:
        """A queue receiving every event from now on, until the block ends."""
        queue: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


#: What :func:`next_event` returns once swapper is shutting down.
STOPPED = object()


async def next_event(
    queue: asyncio.Queue[Any], timeout: float, stop: asyncio.Event | None = None
) -> Any:
    """The next item; None after ``timeout`` seconds (time for a keep-alive ping); STOPPED
    once ``stop`` is set, so long-lived streams end when shutdown begins instead of holding
    it up."""
    get = asyncio.ensure_future(queue.get())
    waiting: set[asyncio.Future[Any]] = {get}
    if stop is not None:
        waiting.add(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in waiting:
            if not future.done():
                future.cancel()
    if get.done() and not get.cancelled():
        return get.result()
    if stop is not None and stop.is_set():
        return STOPPED
    return None
