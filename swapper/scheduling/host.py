"""What a :class:`~swapper.scheduling.runtime.ModelRuntime` needs from its coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from swapper.config import Config

if TYPE_CHECKING:
    from swapper.scheduling.runtime import ModelRuntime

__all__ = ["RuntimeHost"]


class RuntimeHost(Protocol):
    """What a runtime needs from its coordinator."""

    config: Config

    @property
    def closing(self) -> bool:
        """Shutting down: unloads stop rather than sleep."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a tracked background task (cancelled on close)."""
        ...

    def reschedule(self) -> None:
        """Take the decisions the runtime's new state allows."""
        ...

    def next_seq(self) -> int:
        """The next number of the coordinator's arrival/start order."""
        ...

    def load_failed(self, runtime: ModelRuntime, error: Exception) -> None:
        """``runtime`` failed to load: answer its queued requests with ``error``."""
        ...

    def retired(self, runtime: ModelRuntime) -> None:
        """A model removed by a reload is out: forget it."""
        ...
