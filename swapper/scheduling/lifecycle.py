"""How one model moves through its lifecycle: the state machine and the tasks that drive a
backend through it (load or wake, readiness, measuring, watching, sleep or stop).

:class:`ModelLifecycle` is the half of :class:`~swapper.scheduling.coordinator.SwapCoordinator` that talks
to backends; the coordinator's other half decides *what* to load and unload. Every status change
goes through :meth:`ModelLifecycle._transition`; the tasks report back by calling the
coordinator's ``_schedule``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from swapper.backends.contract import BackendHandle, Unloaded
from swapper.config import Config
from swapper.errors import ModelUnavailable
from swapper.scheduling.events import EventBus
from swapper.scheduling.model_state import TRANSITIONS, ModelRecord, ModelStatus
from swapper.scheduling.placement import Placement

__all__ = ["ModelLifecycle"]

logger = logging.getLogger("swapper.coordinator")

#: Readiness polling: first probe after this many seconds, backing off to at most the cap.
_POLL_FIRST = 0.01
_POLL_CAP = 0.1
_POLL_FACTOR = 1.5
#: Starts tried when a backend loses its port to another process between pick and bind.
_PORT_ATTEMPTS = 3


class _BackendExited(Exception):
    """The backend process ended while it was loading."""


class ModelLifecycle(abc.ABC):
    """The state machine, and the load/unload tasks that move models through it."""

    config: Config
    placement: Placement
    events: EventBus
    _closing: bool
    _retired: set[ModelRecord]
    _status_waiters: list[tuple[ModelRecord, frozenset[ModelStatus], asyncio.Future[None]]]

    @abc.abstractmethod
    def _schedule(self) -> None:
        """Take the decisions the new state allows (the coordinator's half)."""

    @abc.abstractmethod
    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]: ...

    @abc.abstractmethod
    def _fail_waiters(self, model: ModelRecord, error: Exception) -> None: ...

    @abc.abstractmethod
    def _next_seq(self) -> int: ...

    @abc.abstractmethod
    def _arm_idle(self, model: ModelRecord) -> None: ...

    @staticmethod
    def _disarm_idle(model: ModelRecord) -> None:
        if model.idle_timer is not None:
            model.idle_timer.cancel()
            model.idle_timer = None

    @staticmethod
    def _disarm_drain(model: ModelRecord) -> None:
        if model.drain_timer is not None:
            model.drain_timer.cancel()
            model.drain_timer = None

    def _transition(
        self, model: ModelRecord, new: ModelStatus, *, error: str | None = None
    ) -> None:
        """The only place a model's status changes; illegal edges are refused."""
        old = model.status
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"illegal transition for {model.id}: {old} -> {new}")
        model.status = new
        if new != ModelStatus.LOADED:
            self._disarm_idle(model)
            self._disarm_drain(model)
            model.evicting_for = None
        if new in (ModelStatus.LOADING, ModelStatus.UNLOADING):
            model.unloaded.clear()
        if new == ModelStatus.LOADING:
            model.last_error = None
        elif new == ModelStatus.LOADED:
            model.loaded_at = time.time()
            model.cut_reason = None
        elif new == ModelStatus.FAILED:
            model.last_error = error
            model.handle = None
        elif new == ModelStatus.UNLOADED:
            model.handle = None
        if new in (ModelStatus.FAILED, ModelStatus.UNLOADED, ModelStatus.SLEEPING):
            model.draining = model.stop_fully = False
            model.unload_to_sleep = model.leaving_sleep = False
            model.vram_mb = model.loaded_at = None
            model.unloaded.set()  # no process serves it any more
        if new in (ModelStatus.FAILED, ModelStatus.UNLOADED):
            model.sleep_vram_mb = None
            if model.pending is not None:  # a reloaded config takes effect from the next start
                self._spawn(model.backend.aclose(), f"close:{model.id}")
                model.backend, model.pending = model.pending, None
                model.failures, model.retry_at = 0, None
                model.restart_reason = "reload"
            if model.removed:
                self._retired.discard(model)
        log = logger.warning if new == ModelStatus.FAILED else logger.debug
        log("%s: %s -> %s%s", model.id, old, new, f" ({error})" if error else "")
        self.events.emit(
            "status",
            model=model.id,
            status=new.value,
            previous=old.value,
            pid=model.handle.pid if model.handle else None,
            last_error=model.last_error,
        )
        for watched, statuses, future in self._status_waiters:
            if watched is model and new in statuses and not future.done():
                future.set_result(None)

    def _start_load(self, model: ModelRecord, *, manual: bool = False) -> None:
        model.load_started = time.monotonic()
        if model.swap_started is None:
            model.swap_started = model.load_started
        reason = "manual" if manual else model.restart_reason or "request"
        model.restart_reason = None
        model.started_seq = self._next_seq()
        waking = model.status == ModelStatus.SLEEPING
        self._transition(model, ModelStatus.LOADING)
        self._spawn(self._load(model, reason, waking), f"load:{model.id}")

    def _start_unload(self, model: ModelRecord, *, full: bool = False) -> None:
        """Move a model out: asleep when its backend can sleep, else (or ``full``) stopped."""
        model.unload_started = time.monotonic()
        target = model.evicting_for
        if target is not None and target.swap_started is None:
            # Unloading to make room: the swap starts now.
            target.swap_from, target.swap_started = model.id, model.unload_started
        asleep = model.status == ModelStatus.SLEEPING
        sleep = (
            model.backend.can_sleep
            and not asleep
            and not full
            and not model.stop_fully
            and not model.removed
            and model.pending is None
            and not self._closing
        )
        charge = self.placement.charge_mb(model)
        model.unload_to_sleep, model.leaving_sleep = sleep, asleep
        self._transition(model, ModelStatus.UNLOADING)
        self._spawn(self._unload(model, sleep, charge), f"unload:{model.id}")

    async def _load(self, model: ModelRecord, reason: str, waking: bool) -> None:
        timeout = self.config.swapper.model_swap_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                if waking and await self._wake(model):
                    reason = "wake" if reason == "request" else reason
                else:
                    await self.placement.wait_for_memory(model, self.placement.start_need_mb(model))
                    await self._start_until_ready(model)
        except asyncio.CancelledError:
            await self._stop_backend(model)
            self._transition(model, ModelStatus.UNLOADING)
            self._transition(model, ModelStatus.UNLOADED)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin's start is a failed load
            model.swap_started = model.swap_from = None
            if isinstance(exc, TimeoutError):
                reason = f"not ready within model_swap_timeout ({timeout:g}s); process killed"
            else:
                reason = str(exc) or type(exc).__name__
            await self._stop_backend(model)
            self._load_failed(model, reason)
            return
        assert model.handle is not None
        model.failures, model.retry_at = 0, None
        self._transition(model, ModelStatus.LOADED)
        now = time.monotonic()
        logger.info("%s loaded in %.3fs (pid %s)", model.id, now - started, model.handle.pid)
        self.events.emit("loaded", model=model.id, seconds=now - started)
        self.events.emit(
            "swap",
            **{
                "from": model.swap_from,
                "to": model.id,
                "reason": reason,
                "seconds": now - (model.swap_started or started),
            },
        )
        model.swap_started = model.swap_from = None
        if model.watcher is None:  # a woken model kept its watcher
            model.watcher = self._spawn(self._watch(model, model.handle), f"watch:{model.id}")
        self._spawn(self._measure(model, model.handle), f"measure:{model.id}")
        self._schedule()
        self._arm_idle(model)  # loaded for a request that gave up, or by an operator

    async def _wake(self, model: ModelRecord) -> bool:
        """Wake a sleeping backend; False (process stopped) when that fails: start it cold."""
        handle = model.handle
        assert handle is not None
        asleep = self.placement.sleep_mb(model)
        extra = self.placement.predicted_mb(model) - asleep
        await self.placement.wait_for_memory(model, extra)
        await self._set_baseline(model, holds_mb=asleep)
        try:
            await model.backend.wake(handle)
            await self._wait_ready(model, handle)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed wake falls back to a cold start
            logger.warning("%s: waking failed (%s); restarting it", model.id, exc)
            await self._stop_backend(model)
            model.handle = None
            return False

    async def _measure(self, model: ModelRecord, handle: BackendHandle) -> None:
        """Measure a loaded model's VRAM; it replaces the estimate (kept in the state file)."""
        try:
            measured = await model.backend.measure_vram_mb(handle)
            if measured is None:
                measured = await self.placement.process_mb(handle.pid)
            if measured is None:
                measured = await self._used_since_baseline(model)
        except Exception:
            logger.exception("%s: measuring VRAM failed", model.id)
            return
        if not measured or model.handle is not handle or model.status != ModelStatus.LOADED:
            return
        model.vram_mb = measured
        logger.info("%s holds %.0f MiB of VRAM", model.id, measured)
        entry = model.backend.entry
        if self.placement.sizes.record(model.id, entry, measured):
            await asyncio.to_thread(self.placement.sizes.save)

    async def _set_baseline(self, model: ModelRecord, holds_mb: float = 0.0) -> None:
        """Before a start (or wake): note NVML's used memory less what ``model`` holds now."""
        used = await self.placement.used_mb()
        mark = self.placement.note_change()
        model.load_baseline = None if used is None else (used - holds_mb, mark)

    async def _used_since_baseline(self, model: ModelRecord) -> float | None:
        """What the device's used memory grew by since :meth:`_set_baseline`, when no other
        backend started, stopped, slept or woke meanwhile; else None (unknown)."""
        baseline, model.load_baseline = model.load_baseline, None
        if baseline is None:
            return None
        used = await self.placement.used_mb()
        if used is None or self.placement.gpu_changes != baseline[1]:
            logger.info(
                "%s: size not learned: NVML cannot tell its process apart and another "
                "backend changed the GPU's memory while it loaded",
                model.id,
            )
            return None
        return max(0.0, used - baseline[0])

    async def _start_until_ready(self, model: ModelRecord) -> None:
        """Start the backend and wait for it; start again if another process took its port."""
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            await self._set_baseline(model)
            model.handle = await model.backend.start()
            try:
                await self._wait_ready(model, model.handle)
                return
            except _BackendExited:
                if attempt == _PORT_ATTEMPTS or not model.backend.port_taken(model.handle):
                    raise
                logger.warning(
                    "%s: port %s was taken before the backend could bind it; "
                    "starting again on another port",
                    model.id,
                    model.handle.port,
                )
                await self._stop_backend(model)

    def _load_failed(self, model: ModelRecord, reason: str) -> None:
        """FAILED, with exponential back-off once failures repeat; waiters get a 503."""
        model.failures += 1
        settings = self.config.swapper
        retry_after: int | None = None
        if model.failures >= settings.max_start_failures:
            exponent = model.failures - settings.max_start_failures
            delay = min(settings.retry_backoff * 2**exponent, settings.retry_backoff_max)
            model.retry_at = time.monotonic() + delay
            retry_after = math.ceil(delay)
            reason += f" ({model.failures} failed starts in a row; next try in {delay:g}s)"
        self._transition(model, ModelStatus.FAILED, error=f"load failed: {reason}")
        self._fail_waiters(
            model,
            ModelUnavailable(
                f"Model {model.id!r} failed to load: {reason}", retry_after=retry_after
            ),
        )
        self._schedule()

    async def _wait_ready(self, model: ModelRecord, handle: BackendHandle) -> None:
        """Probe tightly, backing off from 10 ms to 100 ms; probe at once when the backend logs."""
        backend = model.backend
        output = handle.process.output_seen if handle.process else None
        delay = _POLL_FIRST
        while True:
            if output is not None:
                output.clear()
            if await backend.ready(handle):
                return
            if not await backend.alive(handle):
                raise _BackendExited(await backend.wait_exit(handle))
            if output is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(output.wait(), delay)
            delay = min(delay * _POLL_FACTOR, _POLL_CAP)

    async def _watch(self, model: ModelRecord, handle: BackendHandle) -> None:
        """Notice a backend that dies while resident (or asleep)."""
        reason = await model.backend.wait_exit(handle)
        if model.handle is not handle or model.status not in (
            ModelStatus.LOADED,
            ModelStatus.SLEEPING,
        ):
            return  # we stopped it ourselves
        if isinstance(reason, Unloaded):
            # Its server unloaded the model itself (Ollama's scheduler, to fit another one):
            # an unload like ours, not a crash; the next request loads it again.
            logger.warning("%s: %s", model.id, reason)
            model.watcher = None
            model.last_error = f"unloaded by its backend: {reason}"
            self._start_unload(model, full=True)
            return
        logger.error("%s: backend died unexpectedly: %s", model.id, reason)
        model.watcher = None
        await self._fail_resident(model, f"backend died: {reason}")

    def _check_frozen(self, model: ModelRecord, base_url: str) -> None:
        handle = model.handle
        if (
            handle is None
            or handle.base_url != base_url
            or model.probing
            or model.status != ModelStatus.LOADED
        ):
            return
        model.probing = True
        self._spawn(self._probe_frozen(model, handle), f"probe:{model.id}")

    async def _probe_frozen(self, model: ModelRecord, handle: BackendHandle) -> None:
        """After a read timeout: a backend that cannot even answer its health probe is frozen."""
        timeouts = self.config.timeouts
        try:
            try:
                healthy = await asyncio.wait_for(model.backend.ready(handle), timeouts.health)
            except Exception:  # noqa: BLE001 - a probe that fails in any way is a failed probe
                healthy = False
            if healthy or model.handle is not handle or model.status != ModelStatus.LOADED:
                return
            logger.error(
                "%s: backend frozen (silent past timeouts.read, no health answer in "
                "%gs); killing it",
                model.id,
                timeouts.health,
            )
            await self._fail_resident(
                model,
                f"backend froze: silent for {timeouts.read:g}s (timeouts.read) and no "
                f"health answer within {timeouts.health:g}s; killed",
                kill=True,
            )
        finally:
            model.probing = False

    async def _fail_resident(self, model: ModelRecord, reason: str, *, kill: bool = False) -> None:
        """A resident backend broke: make sure its process is gone, then mark it FAILED."""
        await self._stop_backend(model, kill=kill)
        if model.status in (ModelStatus.LOADED, ModelStatus.SLEEPING):
            self._transition(model, ModelStatus.FAILED, error=reason)
            model.restart_reason = "crashed"
        self._schedule()

    async def _unload(self, model: ModelRecord, sleep: bool, charge: float) -> None:
        placement = self.placement
        used_before = await placement.used_mb()
        if sleep and await self._sleep(model, used_before, charge):
            freed = charge - placement.sleep_mb(model)
            self._transition(model, ModelStatus.SLEEPING)
            verb = "put to sleep"
        else:
            await self._stop_backend(model)
            self._transition(model, ModelStatus.UNLOADED)
            freed, verb = charge, "unloaded"
        placement.expect_release(model.id, used_before, freed)
        seconds = time.monotonic() - model.unload_started
        logger.info("%s %s in %.3fs", model.id, verb, seconds)
        self.events.emit(
            "unloaded",
            model=model.id,
            seconds=seconds,
            sleeping=sleep and model.status == ModelStatus.SLEEPING,
        )
        self._schedule()

    async def _sleep(self, model: ModelRecord, used_before: float | None, charge: float) -> bool:
        """Put a backend to sleep and measure what it still holds; False when it failed.

        What it holds: its processes' memory, or where NVML cannot tell them apart, ``charge``
        less the drop in the device's used memory (when no other backend changed it meanwhile).
        """
        handle = model.handle
        assert handle is not None
        placement = self.placement
        mark = placement.note_change()
        try:
            # Bounded like a load: a backend that hangs going to sleep is stopped instead.
            await asyncio.wait_for(
                model.backend.sleep(handle), self.config.swapper.model_swap_timeout
            )
        except Exception as exc:  # noqa: BLE001 - a backend that cannot sleep is stopped instead
            logger.warning(
                "%s: sleep failed (%s); stopping it instead",
                model.id,
                str(exc) or type(exc).__name__,
            )
            return False
        residual = await placement.process_mb(handle.pid)
        if residual is None and used_before is not None:
            used_after = await placement.used_mb()
            if used_after is not None and placement.gpu_changes == mark:
                residual = max(0.0, charge - (used_before - used_after))
        model.sleep_vram_mb = residual
        if residual is not None:
            logger.info("%s holds %.0f MiB of VRAM asleep", model.id, residual)
        return True

    async def _stop_backend(self, model: ModelRecord, *, kill: bool = False) -> None:
        watcher, model.watcher = model.watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if model.handle is not None:
            self.placement.note_change()
            try:
                if kill:
                    await model.backend.kill(model.handle)
                else:
                    await model.backend.stop(model.handle)
            except Exception:  # a plugin's stop failing must not wedge the coordinator
                logger.exception("%s: stopping the backend failed", model.id)
        await model.backend.aclose()
