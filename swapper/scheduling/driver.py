"""Drives one backend process: start until ready, wake, sleep, stop, probe and measure.

A :class:`BackendDriver` knows nothing of statuses or queues: its :class:`ModelRuntime
<swapper.scheduling.runtime.ModelRuntime>` owner decides when to call it and what the outcome
means. It holds the backend, the handle of its running process and the measuring baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from swapper.backends.contract import Backend, BackendHandle
from swapper.scheduling.placement import Placement

__all__ = ["BackendDriver", "BackendExited"]

logger = logging.getLogger("swapper.coordinator")

#: Readiness polling: first probe after this many seconds, backing off to at most the cap.
_POLL_FIRST = 0.01
_POLL_CAP = 0.1
_POLL_FACTOR = 1.5
#: Starts tried when a backend loses its port to another process between pick and bind.
_PORT_ATTEMPTS = 3


class BackendExited(Exception):
    """The backend process ended while it was loading."""


class BackendDriver:
    """One model's backend and its running process."""

    def __init__(self, model_id: str, backend: Backend, placement: Placement) -> None:
        self.model_id = model_id
        self.backend = backend
        self.placement = placement
        self.handle: BackendHandle | None = None
        #: NVML's used MiB without this model, and :attr:`Placement.gpu_changes` once its start
        #: (or wake) was counted: the fallback measurement where NVML cannot tell our processes
        #: apart.
        self.load_baseline: tuple[float, int] | None = None

    async def start_until_ready(self) -> BackendHandle:
        """Start the backend and wait for it; start again if another process took its port."""
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            await self.set_baseline()
            handle = self.handle = await self.backend.start()
            try:
                await self.wait_ready(handle)
                return handle
            except BackendExited:
                if attempt == _PORT_ATTEMPTS or not self.backend.port_taken(handle):
                    raise
                logger.warning(
                    "%s: port %s was taken before the backend could bind it; "
                    "starting again on another port",
                    self.model_id,
                    handle.port,
                )
                await self.stop()
        raise AssertionError("unreachable")  # the loop returns or raises

    async def wake(self, holds_mb: float) -> bool:
        """Wake a sleeping backend; False (process stopped) when that fails: start it cold."""
        handle = self.handle
        assert handle is not None
        await self.set_baseline(holds_mb=holds_mb)
        if handle.process is not None:
            handle.process.gather_output(False)  # what it prints waking is read at once
        try:
            await self.backend.wake(handle)
            await self.wait_ready(handle)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed wake falls back to a cold start
            logger.warning("%s: waking failed (%s); restarting it", self.model_id, exc)
            await self.stop()
            self.handle = None
            return False

    async def wait_ready(self, handle: BackendHandle) -> None:
        """Probe tightly, backing off from 10 ms to 100 ms; probe at once when the backend logs."""
        backend = self.backend
        process = handle.process
        output = process.output_seen if process else None
        if process is not None:
            process.gather_output(False)
        delay = _POLL_FIRST
        while True:
            if output is not None:
                output.clear()
            if await backend.ready(handle):
                if process is not None:
                    process.gather_output(True)
                return
            if not await backend.alive(handle):
                raise BackendExited(await backend.wait_exit(handle))
            if output is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(output.wait(), delay)
            delay = min(delay * _POLL_FACTOR, _POLL_CAP)

    async def healthy(self, handle: BackendHandle, timeout: float) -> bool:
        """Whether the backend answers its health probe within ``timeout``."""
        try:
            return await asyncio.wait_for(self.backend.ready(handle), timeout)
        except Exception:  # noqa: BLE001 - a probe that fails in any way is a failed probe
            return False

    async def measure(self, handle: BackendHandle) -> float | None:
        """The VRAM a loaded backend holds: its own figure, its processes', else the growth of
        the device's used memory since the baseline (None: unknown)."""
        measured = await self.backend.measure_vram_mb(handle)
        if measured is None:
            measured = await self.placement.process_mb(handle.pid)
        if measured is None:
            measured = await self._used_since_baseline()
        return measured

    async def set_baseline(self, holds_mb: float = 0.0) -> None:
        """Before a start (or wake): note NVML's used memory less what the model holds now."""
        used = await self.placement.used_mb()
        mark = self.placement.note_change()
        self.load_baseline = None if used is None else (used - holds_mb, mark)

    async def _used_since_baseline(self) -> float | None:
        """What the device's used memory grew by since :meth:`set_baseline`, when no other
        backend started, stopped, slept or woke meanwhile; else None (unknown)."""
        baseline, self.load_baseline = self.load_baseline, None
        if baseline is None:
            return None
        used = await self.placement.used_mb()
        if used is None or self.placement.gpu_changes != baseline[1]:
            logger.info(
                "%s: size not learned: NVML cannot tell its process apart and another "
                "backend changed the GPU's memory while it loaded",
                self.model_id,
            )
            return None
        return max(0.0, used - baseline[0])

    async def sleep(
        self, used_before: float | None, charge: float, timeout: float
    ) -> tuple[bool, float | None]:
        """Put the backend to sleep: (whether it slept, the MiB it still holds if known).

        What it holds: its processes' memory, or where NVML cannot tell them apart, ``charge``
        less the drop in the device's used memory (when no other backend changed it meanwhile).
        """
        handle = self.handle
        assert handle is not None
        placement = self.placement
        mark = placement.note_change()
        try:
            # Bounded like a load: a backend that hangs going to sleep is stopped instead.
            await asyncio.wait_for(self.backend.sleep(handle), timeout)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot sleep is stopped instead
            logger.warning(
                "%s: sleep failed (%s); stopping it instead",
                self.model_id,
                str(exc) or type(exc).__name__,
            )
            return False, None
        residual = await placement.process_mb(handle.pid)
        if residual is None and used_before is not None:
            used_after = await placement.used_mb()
            if used_after is not None and placement.gpu_changes == mark:
                residual = max(0.0, charge - (used_before - used_after))
        if residual is not None:
            logger.info("%s holds %.0f MiB of VRAM asleep", self.model_id, residual)
        return True, residual

    async def stop(self, *, kill: bool = False) -> None:
        """Stop (or kill) the process, if any, and close the backend's resources."""
        if self.handle is not None:
            self.placement.note_change()
            try:
                if kill:
                    await self.backend.kill(self.handle)
                else:
                    await self.backend.stop(self.handle)
            except Exception:  # a plugin's stop failing must not wedge the coordinator
                logger.exception("%s: stopping the backend failed", self.model_id)
        await self.backend.aclose()
