"""The idle clock of one model: unload a resident model that sat idle for its ttl, or for the
keep_alive a client asked for (Ollama's semantics)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from swapper.scheduling.model_state import ModelStatus

if TYPE_CHECKING:
    from swapper.scheduling.runtime import ModelRuntime

__all__ = ["IdleClock"]

logger = logging.getLogger("swapper.coordinator")


class IdleClock:
    """Runs while a resident model has nothing in flight; when it rings, the model drains."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.timer: asyncio.TimerHandle | None = None
        #: A client's keep_alive (seconds; negative: never), until the model next unloads.
        self.keep_alive_s: float | None = None

    def keep_alive(self, seconds: float | None) -> None:
        """A client's keep_alive: 0 unloads once idle, negative never unloads when idle,
        positive is the idle ttl from now on; None returns to the configured ttl."""
        self.keep_alive_s = seconds
        self.disarm()
        self.arm()

    def ttl(self) -> float | None:
        """Seconds idle before the model unloads; None: never."""
        if self.keep_alive_s is not None:
            return None if self.keep_alive_s < 0 else self.keep_alive_s
        rt = self.runtime
        config = rt.host.config
        entry = config.models.get(rt.id)
        ttl = entry.ttl if entry is not None else None
        ttl = config.swapper.default_ttl if ttl is None else ttl
        return ttl if ttl > 0 else None

    def arm(self) -> None:
        """Start the clock of a resident model with nothing in flight."""
        ttl = self.ttl()
        rt = self.runtime
        if ttl is None or rt.status != ModelStatus.LOADED or rt.in_flight:
            return
        self.disarm()
        self.timer = asyncio.get_running_loop().call_later(ttl, self._expired)

    def disarm(self) -> None:
        """Stop the clock."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        rt = self.runtime
        if rt.status == ModelStatus.LOADED and not rt.in_flight and not rt.queued:
            logger.info("%s idle for %gs (ttl); unloading", rt.id, self.ttl() or 0.0)
            rt.drain()
            rt.host.reschedule()
