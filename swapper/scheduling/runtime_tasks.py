"""The background tasks of one :class:`~swapper.scheduling.runtime.ModelRuntime`: load (or
wake), unload (sleep or stop), watch the process, probe a silent backend, measure its VRAM,
and the drain deadline of an evicted model.

Each task drives the runtime's :class:`~swapper.scheduling.driver.BackendDriver` and records the
outcome through the runtime's public :meth:`transition`; it tells the coordinator through the
runtime's host (``reschedule``, ``load_failed``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from swapper.backends.contract import BackendHandle, Unloaded
from swapper.errors import ModelUnavailable
from swapper.scheduling.model_state import Eviction, Exit, ModelStatus

if TYPE_CHECKING:
    from swapper.scheduling.runtime import ModelRuntime

__all__ = ["RuntimeTasks"]

logger = logging.getLogger("swapper.coordinator")

_S = ModelStatus


class RuntimeTasks:
    """Load, unload, watch and probe tasks for one model."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        #: Notices the process dying while resident (or asleep).
        self.watcher: asyncio.Task[None] | None = None
        #: A frozen-backend probe is running.
        self.probing = False

    def arm_drain(self) -> None:
        """Start the drain deadline of a model chosen for eviction that still serves requests."""
        rt = self.runtime
        eviction = rt.eviction
        if eviction is not None and rt.in_flight and eviction.deadline is None:
            eviction.deadline = asyncio.get_running_loop().call_later(
                rt.host.config.swapper.drain_timeout, self._drain_expired, eviction
            )

    def _drain_expired(self, eviction: Eviction) -> None:
        """An evicted model's requests ran past drain_timeout: cut them off, with a reason."""
        rt = self.runtime
        eviction.deadline = None
        if rt.eviction is not eviction or rt.status != _S.LOADED or not rt.in_flight:
            return
        timeout = rt.host.config.swapper.drain_timeout
        target = eviction.target.id
        rt.cut_reason = (
            f"Model {rt.id!r} was unloaded to make room for {target!r}: its requests did "
            f"not finish within swapper.drain_timeout ({timeout:g}s)"
        )
        logger.warning(
            "%s: %d request(s) still running after drain_timeout (%gs); cutting "
            "them off to load %s",
            rt.id,
            rt.in_flight,
            timeout,
            target,
        )
        rt.start_unload()

    async def load(self, reason: str, waking: bool) -> None:
        """LOADING → LOADED (or FAILED): wake, or wait for memory and start until ready."""
        rt = self.runtime
        driver, placement = rt.driver, rt.placement
        timeout = rt.host.config.swapper.model_swap_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                woke = False
                if waking:
                    asleep = rt.sleep_mb
                    await placement.wait_for_memory(rt, placement.predicted_mb(rt) - asleep)
                    woke = await driver.wake(holds_mb=asleep)
                if woke:
                    reason = "wake" if reason == "request" else reason
                else:
                    await placement.wait_for_memory(rt, placement.start_need_mb(rt))
                    await driver.start_until_ready()
        except asyncio.CancelledError:
            await self.stop_backend()
            rt.exit = Exit.STOP
            rt.transition(_S.UNLOADING)
            rt.transition(_S.UNLOADED)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin's start is a failed load
            rt.swap_started = rt.swap_from = None
            if isinstance(exc, TimeoutError):
                reason = f"not ready within model_swap_timeout ({timeout:g}s); process killed"
            else:
                reason = str(exc) or type(exc).__name__
            await self.stop_backend()
            self._load_failed(reason)
            return
        handle = rt.handle
        assert handle is not None
        rt.failures, rt.retry_at = 0, None
        rt.transition(_S.LOADED)
        now = time.monotonic()
        logger.info("%s loaded in %.3fs (pid %s)", rt.id, now - started, handle.pid)
        rt.events.emit("loaded", model=rt.id, seconds=now - started)
        rt.events.emit(
            "swap",
            **{
                "from": rt.swap_from,
                "to": rt.id,
                "reason": reason,
                "seconds": now - (rt.swap_started or started),
            },
        )
        rt.swap_started = rt.swap_from = None
        if self.watcher is None:  # a woken model kept its watcher
            self.watcher = rt.host.spawn(self._watch(handle), f"watch:{rt.id}")
        rt.host.spawn(self._measure(handle), f"measure:{rt.id}")
        rt.host.reschedule()
        rt.idle.arm()  # loaded for a request that gave up, or by an operator

    def _load_failed(self, reason: str) -> None:
        """FAILED, with exponential back-off once failures repeat; waiters get a 503."""
        rt = self.runtime
        rt.failures += 1
        settings = rt.host.config.swapper
        retry_after: int | None = None
        if rt.failures >= settings.max_start_failures:
            exponent = rt.failures - settings.max_start_failures
            delay = min(settings.retry_backoff * 2**exponent, settings.retry_backoff_max)
            rt.retry_at = time.monotonic() + delay
            retry_after = math.ceil(delay)
            reason += f" ({rt.failures} failed starts in a row; next try in {delay:g}s)"
        rt.transition(_S.FAILED, error=f"load failed: {reason}")
        error = ModelUnavailable(
            f"Model {rt.id!r} failed to load: {reason}", retry_after=retry_after
        )
        rt.host.load_failed(rt, error)

    async def _measure(self, handle: BackendHandle) -> None:
        """Measure a loaded model's VRAM; it replaces the estimate (kept in the state file)."""
        rt = self.runtime
        try:
            measured = await rt.driver.measure(handle)
        except Exception:
            logger.exception("%s: measuring VRAM failed", rt.id)
            return
        if not measured or rt.handle is not handle or rt.status != _S.LOADED:
            return
        rt.vram_mb = measured
        logger.info("%s holds %.0f MiB of VRAM", rt.id, measured)
        sizes = rt.placement.sizes
        if sizes.record(rt.id, rt.backend.entry, measured):
            await asyncio.to_thread(sizes.save)

    async def _watch(self, handle: BackendHandle) -> None:
        """Notice a backend that dies while resident (or asleep)."""
        rt = self.runtime
        reason = await rt.backend.wait_exit(handle)
        if rt.handle is not handle or rt.status not in (_S.LOADED, _S.SLEEPING):
            return  # we stopped it ourselves
        self.watcher = None
        if isinstance(reason, Unloaded):
            # Its server unloaded the model itself (Ollama's scheduler, to fit another one):
            # an unload like ours, not a crash; the next request loads it again.
            logger.warning("%s: %s", rt.id, reason)
            rt.last_error = f"unloaded by its backend: {reason}"
            rt.start_unload(full=True)
            return
        logger.error("%s: backend died unexpectedly: %s", rt.id, reason)
        await self._fail_resident(f"backend died: {reason}")

    def check_frozen(self, base_url: str) -> None:
        """Start a frozen-backend probe, unless one runs or the request's backend is gone."""
        rt = self.runtime
        handle = rt.handle
        if handle is None or handle.base_url != base_url or self.probing or rt.status != _S.LOADED:
            return
        self.probing = True
        rt.host.spawn(self._probe_frozen(handle), f"probe:{rt.id}")

    async def _probe_frozen(self, handle: BackendHandle) -> None:
        """After a read timeout: a backend that cannot even answer its health probe is frozen."""
        rt = self.runtime
        timeouts = rt.host.config.timeouts
        try:
            healthy = await rt.driver.healthy(handle, timeouts.health)
            if healthy or rt.handle is not handle or rt.status != _S.LOADED:
                return
            logger.error(
                "%s: backend frozen (silent past timeouts.read, no health answer in "
                "%gs); killing it",
                rt.id,
                timeouts.health,
            )
            await self._fail_resident(
                f"backend froze: silent for {timeouts.read:g}s (timeouts.read) and no "
                f"health answer within {timeouts.health:g}s; killed",
                kill=True,
            )
        finally:
            self.probing = False

    async def settle_unreachable(self, base_url: str) -> None:
        """After a refused or reset connection: if the backend died, wait until that is noticed.

        The watcher marks a dead backend FAILED, and the next acquire restarts it; a backend
        still alive gets its request again on a fresh connection.
        """
        rt = self.runtime
        handle = rt.handle
        if handle is None or handle.base_url != base_url or rt.status != _S.LOADED:
            return  # noticed already: a restart (or another model) is on its way
        try:
            async with asyncio.timeout(rt.host.config.timeouts.health):
                await rt.backend.wait_exit(handle)
                while rt.handle is handle and rt.status == _S.LOADED:
                    await rt.next_status(frozenset(ModelStatus))
        except TimeoutError:
            pass  # it lives: a closed pooled connection, not a crash

    async def _fail_resident(self, reason: str, *, kill: bool = False) -> None:
        """A resident backend broke: make sure its process is gone, then mark it FAILED."""
        rt = self.runtime
        await self.stop_backend(kill=kill)
        if rt.status in (_S.LOADED, _S.SLEEPING):
            rt.transition(_S.FAILED, error=reason)
            rt.restart_reason = "crashed"
        rt.host.reschedule()

    async def unload(self, sleep: bool, charge: float) -> None:
        """UNLOADING → SLEEPING (when asked and it works) or UNLOADED."""
        rt = self.runtime
        placement = rt.placement
        before = await placement.device_used_mb()
        used_before = None if before is None else sum(before.values())
        slept = False
        if sleep:
            timeout = rt.host.config.swapper.model_swap_timeout
            slept, residual = await rt.driver.sleep(used_before, charge, timeout)
            if slept:
                rt.sleep_vram_mb = residual
        if slept:
            freed = charge - rt.sleep_mb
            rt.transition(_S.SLEEPING)
            verb = "put to sleep"
        else:
            await self.stop_backend()
            rt.transition(_S.UNLOADED)
            freed, verb = charge, "unloaded"
        placement.expect_release(rt, before, freed)
        seconds = time.monotonic() - rt.unload_started
        logger.info("%s %s in %.3fs", rt.id, verb, seconds)
        rt.events.emit(
            "unloaded",
            model=rt.id,
            seconds=seconds,
            sleeping=sleep and rt.status == _S.SLEEPING,
        )
        rt.host.reschedule()

    async def stop_backend(self, *, kill: bool = False) -> None:
        """Cancel the watcher (unless it is the caller) and stop the process."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        await self.runtime.driver.stop(kill=kill)
