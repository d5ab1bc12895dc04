"""Each model's backend output: a ring buffer kept across restarts, and followers.

The buffer is bounded twice: at most ``size`` lines and at most ``max_bytes`` characters in all,
so a backend printing long lines cannot make swapper hold more than ``max_bytes`` per model.
A line longer than ``max_line`` is cut.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator

__all__ = ["ModelLog"]


class ModelLog:
    """The last lines a model's backends printed; followers get new lines as they come."""

    def __init__(self, size: int = 1000, max_bytes: int = 1 << 20, max_line: int = 8192) -> None:
        self.lines: collections.deque[str] = collections.deque()
        self.size = size
        self.max_bytes = max_bytes
        self.max_line = max_line
        #: Characters held in :attr:`lines` (a close enough stand-in for bytes).
        self.held = 0
        self._followers: set[asyncio.Queue[str]] = set()

    def append(self, line: str) -> None:
        """Record one line (called by the backend's output reader)."""
        if len(line) > self.max_line:
            line = f"{line[: self.max_line]}... ({len(line) - self.max_line:,} characters cut)"
        self.lines.append(line)
        self.held += len(line)
        while self.lines and (len(self.lines) > self.size or self.held > self.max_bytes):
            self.held -= len(self.lines.popleft())
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
