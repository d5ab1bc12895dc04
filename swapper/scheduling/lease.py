"""A request's permission to use a resident model, released when its response ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swapper.scheduling.coordinator import SwapCoordinator
    from swapper.scheduling.runtime import ModelRuntime

__all__ = ["Lease"]


class Lease:
    """Permission to send one request to a resident model; release it when the response ends."""

    __slots__ = ("_coordinator", "_runtime", "base_url", "max_connections", "released")

    def __init__(self, coordinator: SwapCoordinator, runtime: ModelRuntime, base_url: str) -> None:
        self._coordinator = coordinator
        self._runtime = runtime
        self.base_url = base_url
        handle = runtime.handle
        self.max_connections = handle.max_connections if handle else None
        self.released = False

    @property
    def model_id(self) -> str:
        """The model this lease is for."""
        return self._runtime.id

    def release(self, *, used: bool = True) -> None:
        """End the request (idempotent); ``used=False`` leaves ``last_used`` alone."""
        if not self.released:
            self.released = True
            self._coordinator.release(self._runtime, used=used)

    async def backend_unreachable(self) -> None:
        """The backend refused or dropped the connection: wait until a crash is noticed."""
        await self._runtime.settle_unreachable(self.base_url)

    def backend_silent(self) -> None:
        """The backend missed ``timeouts.read``: have its runtime check whether it froze."""
        self._runtime.check_frozen(self.base_url)

    @property
    def cut_reason(self) -> str | None:
        """Why the request was cut off (its model was evicted past drain_timeout), if it was."""
        return self._runtime.cut_reason

    @property
    def upstream_model(self) -> str | None:
        """The backend's own name for the model, when requests must be rewritten to it."""
        return self._runtime.backend.upstream_model()

    @property
    def upstream_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Headers the backend needs on every request (the ``openai`` backend's api_key)."""
        return self._runtime.backend.upstream_headers()
