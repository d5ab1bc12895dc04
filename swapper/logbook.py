"""Each model's backend output: a bounded ring buffer kept across restarts, and followers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator

__all__ = ["ModelLog"]


class ModelLog:
    """The last ``size`` lines a model's backends printed; followers get new lines as they come."""

    def __init__(self, size: int = 1000) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self._followers: set[asyncio.Queue[str]] = set()

    def append(self, line: str) -> None:
        """Record one line (called by the backend's output reader)."""
        self.lines.append(line)
        for queue in self._followers:
            if queue.full():  # a slow follower loses lines rather than slowing the backend
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(line)

    def tail(self, count: int | None = None) -> list[str]:
        """The last ``count`` lines (all kept lines when None)."""
        lines = list(self.lines)
        return lines if count is None else lines[-count:] if count > 0 else []

    @contextlib.contextmanager
    def follow(self) -> Iterator[asyncio.Queue[str]]:
        """A queue of the lines printed from now on, until the block ends."""
        queue: asyncio.Queue[str] = asyncio.Queue(1000)
        self._followers.add(queue)
        try:
            yield queue
        finally:
            self._followers.discard(queue)
