"""The swap coordinator: the one owner of model state.

In single-active mode one model holds the GPU slot at a time. A request *acquires* a lease on
its model; the coordinator admits it at once when that model is resident, or queues it and
schedules loads and unloads so that:

* concurrent first requests for one model cause exactly one load;
* requests are served in arrival order across models, except that requests for the resident
  model may overtake a request waiting for another model at most ``max_overtake`` times
  (anti-thrash batching with a bound, so no model starves);
* a swap waits for the resident model's in-flight requests, stops its process (SIGTERM, grace,
  SIGKILL, reaped) and only then starts the next one.

All scheduling decisions are taken synchronously in :meth:`SwapCoordinator._schedule` on the
event loop, so there is no lock and no interleaving to reason about; loads and unloads run as
tasks that report back through :meth:`SwapCoordinator._transition`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import enum
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from swapper.backend import Backend, BackendHandle, BackendSettings
from swapper.config import Config
from swapper.errors import ModelNotFound, ModelUnavailable, ServiceUnavailable
from swapper.plugins import BackendRegistry

__all__ = ["Lease", "ModelStatus", "SwapCoordinator"]

logger = logging.getLogger("swapper.coordinator")

#: Readiness polling: first probe after this many seconds, backing off to at most the cap.
_POLL_FIRST = 0.01
_POLL_CAP = 0.1
_POLL_FACTOR = 1.5


class ModelStatus(enum.StrEnum):
    """Where a model is in its lifecycle."""

    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
    LOADED = "LOADED"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


_S = ModelStatus
#: Every legal edge of the model state machine; anything else is a bug and is refused.
_EDGES: dict[ModelStatus, frozenset[ModelStatus]] = {
    # a request or an admin load starts it
    _S.UNLOADED: frozenset({_S.LOADING}),
    # ready → LOADED; died, timed out or start failed → FAILED; stopped while loading → UNLOADING
    _S.LOADING: frozenset({_S.LOADED, _S.FAILED, _S.UNLOADING}),
    # swapped out, unloaded or shut down → UNLOADING; the process died → FAILED
    _S.LOADED: frozenset({_S.UNLOADING, _S.FAILED}),
    # the process is gone
    _S.UNLOADING: frozenset({_S.UNLOADED}),
    # the next request retries; an admin unload clears the failure
    _S.FAILED: frozenset({_S.LOADING, _S.UNLOADED}),
}


@dataclass(eq=False)
class _Model:
    id: str
    backend: Backend
    status: ModelStatus = ModelStatus.UNLOADED
    handle: BackendHandle | None = None
    loaded_at: float | None = None
    last_error: str | None = None
    in_flight: int = 0
    queued: int = 0
    last_used: float | None = None
    watcher: asyncio.Task[None] | None = None
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Waiter:
    model: _Model
    seq: int
    future: asyncio.Future[str]  # resolves to the backend's base URL on admission


class Lease:
    """Permission to send one request to a resident model; release it when the response ends."""

    __slots__ = ("_coordinator", "_model", "base_url", "released")

    def __init__(self, coordinator: SwapCoordinator, model: _Model, base_url: str) -> None:
        self._coordinator = coordinator
        self._model = model
        self.base_url = base_url
        self.released = False

    @property
    def model_id(self) -> str:
        """The model this lease is for."""
        return self._model.id

    def release(self) -> None:
        """End the request (idempotent)."""
        if not self.released:
            self.released = True
            self._coordinator._release(self._model)


class SwapCoordinator:
    """Owns every model's state and decides what is resident."""

    def __init__(self, config: Config, registry: BackendRegistry) -> None:
        self.config = config
        settings = BackendSettings(
            gpu_enabled=config.swapper.gpu_enabled,
            metal_acceleration=config.swapper.metal_acceleration,
            stop_timeout=config.swapper.stop_timeout,
        )
        self._models: dict[str, _Model] = {}
        for model_id, entry in config.models.items():
            backend = registry.backends[entry.backend](model_id, entry, settings)
            model = _Model(id=model_id, backend=backend)
            model.unloaded.set()
            self._models[model_id] = model
        self._names = {name: mid for mid, e in config.models.items() for name in (mid, *e.aliases)}
        self._active: _Model | None = None
        self._draining = False
        self._overtaken = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_waiters: list[tuple[_Model, frozenset[ModelStatus], asyncio.Future[None]]] = []
        self._closing = False

    # -- public API -------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The model id for an id or alias; ModelNotFound otherwise."""
        try:
            return self._names[name]
        except KeyError:
            raise ModelNotFound(f"The model {name!r} does not exist") from None

    async def acquire(self, model_id: str) -> Lease:
        """Wait until ``model_id`` is resident and admitted; the caller must release the lease."""
        if self._closing:
            raise ServiceUnavailable("swapper is shutting down")
        model = self._models[model_id]
        if self._may_admit(model):
            return self._admit(model)
        waiter = _Waiter(model, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        model.queued += 1
        self._schedule()
        try:
            base_url = await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(model)  # admitted just as the client went away
            else:
                self._drop_waiter(waiter)
                self._schedule()
            raise
        return Lease(self, model, base_url)

    async def load(self, model_id: str) -> None:
        """Make ``model_id`` resident (swapping as a request would) and return once it is."""
        lease = await self.acquire(model_id)
        lease.release()

    async def unload(self, model_id: str) -> None:
        """Unload ``model_id`` once its in-flight requests finish; clears a FAILED state."""
        model = self._models[model_id]
        if model.status == ModelStatus.FAILED:
            self._transition(model, ModelStatus.UNLOADED)
        elif model is self._active and model.status != ModelStatus.UNLOADING:
            self._draining = True
            self._schedule()
        await model.unloaded.wait()

    async def wait_for_status(self, model_id: str, *statuses: ModelStatus) -> None:
        """Return once ``model_id`` is in one of ``statuses`` (an event, not a poll)."""
        model = self._models[model_id]
        if model.status in statuses:
            return
        future = asyncio.get_running_loop().create_future()
        entry = (model, frozenset(statuses), future)
        self._status_waiters.append(entry)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._status_waiters.remove(entry)

    @property
    def active_model(self) -> str | None:
        """The model holding the GPU slot (loading, loaded or unloading), if any."""
        return self._active.id if self._active else None

    def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        models = {}
        for model in self._models.values():
            handle = model.handle
            models[model.id] = {
                "status": model.status.value,
                "backend": model.backend.name,
                "pid": handle.pid if handle else None,
                "port": handle.port if handle else None,
                "loaded_at": _iso(model.loaded_at),
                "last_error": model.last_error,
                "in_flight": model.in_flight,
                "queued": model.queued,
            }
        return {"mode": self.config.swapper.mode, "active_model": self.active_model,
                "models": models}

    def model_status(self, model_id: str) -> ModelStatus:
        """The current status of one model."""
        return self._models[model_id].status

    async def close(self) -> None:
        """Refuse new work, fail queued requests and stop every backend."""
        self._closing = True
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.model.queued -= 1
            if not waiter.future.done():
                waiter.future.set_exception(ServiceUnavailable("swapper is shutting down"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for model in self._models.values():
            if model.status == ModelStatus.LOADED:
                self._transition(model, ModelStatus.UNLOADING)
            await self._stop_backend(model)
            if model.status == ModelStatus.UNLOADING:
                self._transition(model, ModelStatus.UNLOADED)
        self._active = None

    # -- scheduling ---------------------------------------------------------------------------

    def _others_waiting(self, model: _Model) -> bool:
        return len(self._waiters) > model.queued

    def _may_admit(self, model: _Model) -> bool:
        """Fast path: the model is resident and no swap is due."""
        return (
            model is self._active
            and model.status == ModelStatus.LOADED
            and not self._draining
            and model.queued == 0
            and not self._closing
            and (not self._others_waiting(model) or self._overtaken < self.config.swapper.max_overtake)
        )

    def _admit(self, model: _Model) -> Lease:
        if self._others_waiting(model):
            self._overtaken += 1
        model.in_flight += 1
        assert model.handle is not None
        return Lease(self, model, model.handle.base_url)

    def _drop_waiter(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            waiter.model.queued -= 1

    def _release(self, model: _Model) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()
        if model.in_flight == 0 and (self._waiters or self._draining):
            self._schedule()

    def _schedule(self) -> None:
        """Take every decision the current state allows; never awaits."""
        if self._closing:
            return
        active = self._active
        if active is None:
            if self._waiters:
                self._start_load(self._waiters[0].model)
            return
        if active.status != ModelStatus.LOADED:
            return  # a load or unload is running; its end calls us again
        if not self._draining:
            self._admit_queued(active)
        if self._others_waiting(active) and active.queued == 0:
            # Requests for the resident model that were here first have been served; with
            # nothing of its own left to admit, idling would only delay the others.
            if active.in_flight == 0:
                self._draining = True
        if self._draining and active.in_flight == 0:
            self._start_unload(active)

    def _admit_queued(self, active: _Model) -> None:
        """Admit waiters for the resident model: earlier arrivals freely, later ones up to the bound."""
        first_other = next((w.seq for w in self._waiters if w.model is not active), None)
        bound = self.config.swapper.max_overtake
        for waiter in list(self._waiters):
            if waiter.model is not active:
                continue
            if first_other is not None and waiter.seq > first_other:
                if self._overtaken >= bound:
                    self._draining = True
                    return
                self._overtaken += 1
            self._waiters.remove(waiter)
            active.queued -= 1
            active.in_flight += 1
            assert active.handle is not None
            waiter.future.set_result(active.handle.base_url)
        if first_other is not None and self._overtaken >= bound:
            self._draining = True

    def _fail_waiters(self, model: _Model, error: Exception) -> None:
        for waiter in [w for w in self._waiters if w.model is model]:
            self._drop_waiter(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- state machine ------------------------------------------------------------------------

    def _transition(self, model: _Model, new: ModelStatus, *, error: str | None = None) -> None:
        """The only place a model's status changes; illegal edges are refused."""
        old = model.status
        if new not in _EDGES[old]:
            raise RuntimeError(f"illegal transition for {model.id}: {old} -> {new}")
        model.status = new
        if new == ModelStatus.LOADING:
            model.last_error = None
            model.unloaded.clear()
        elif new == ModelStatus.LOADED:
            model.loaded_at = time.time()
        elif new == ModelStatus.FAILED:
            model.last_error = error
            model.loaded_at = None
            model.handle = None
        elif new == ModelStatus.UNLOADED:
            model.loaded_at = None
            model.handle = None
            model.unloaded.set()
        if new in (ModelStatus.FAILED, ModelStatus.UNLOADED) and self._active is model:
            self._active = None
            self._draining = False
        log = logger.warning if new == ModelStatus.FAILED else logger.debug
        log("%s: %s -> %s%s", model.id, old, new, f" ({error})" if error else "")
        for watched, statuses, future in self._status_waiters:
            if watched is model and new in statuses and not future.done():
                future.set_result(None)

    def _start_load(self, model: _Model) -> None:
        self._active = model
        self._draining = False
        self._overtaken = 0
        self._transition(model, ModelStatus.LOADING)
        self._spawn(self._load(model), f"load:{model.id}")

    def _start_unload(self, model: _Model) -> None:
        self._transition(model, ModelStatus.UNLOADING)
        self._spawn(self._unload(model), f"unload:{model.id}")

    async def _load(self, model: _Model) -> None:
        timeout = self.config.swapper.model_swap_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                model.handle = await model.backend.start()
                await self._wait_ready(model, model.handle)
        except asyncio.CancelledError:
            await self._stop_backend(model)
            self._transition(model, ModelStatus.UNLOADING)
            self._transition(model, ModelStatus.UNLOADED)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin's start is a failed load
            if isinstance(exc, TimeoutError):
                reason = f"not ready within model_swap_timeout ({timeout:g}s); process killed"
            else:
                reason = str(exc) or type(exc).__name__
            await self._stop_backend(model)
            self._transition(model, ModelStatus.FAILED, error=f"load failed: {reason}")
            self._fail_waiters(model, ModelUnavailable(f"Model {model.id!r} failed to load: {reason}"))
            self._schedule()
            return
        assert model.handle is not None
        self._transition(model, ModelStatus.LOADED)
        logger.info("%s loaded in %.3fs (pid %s)", model.id, time.monotonic() - started,
                    model.handle.pid)
        model.watcher = self._spawn(self._watch(model, model.handle), f"watch:{model.id}")
        self._schedule()

    async def _wait_ready(self, model: _Model, handle: BackendHandle) -> None:
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
                raise RuntimeError(await backend.wait_exit(handle))
            if output is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(output.wait(), delay)
            delay = min(delay * _POLL_FACTOR, _POLL_CAP)

    async def _watch(self, model: _Model, handle: BackendHandle) -> None:
        """Notice a backend that dies while resident."""
        reason = await model.backend.wait_exit(handle)
        if model.handle is not handle or model.status != ModelStatus.LOADED:
            return  # we stopped it ourselves
        logger.error("%s: backend died unexpectedly: %s", model.id, reason)
        model.watcher = None
        await self._stop_backend(model)  # reap what is left of its process group
        self._transition(model, ModelStatus.FAILED, error=f"backend died: {reason}")
        self._schedule()

    async def _unload(self, model: _Model) -> None:
        await self._stop_backend(model)
        self._transition(model, ModelStatus.UNLOADED)
        logger.info("%s unloaded", model.id)
        self._schedule()

    async def _stop_backend(self, model: _Model) -> None:
        watcher, model.watcher = model.watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if model.handle is not None:
            try:
                await model.backend.stop(model.handle)
            except Exception:  # a plugin's stop failing must not wedge the coordinator
                logger.exception("%s: stopping the backend failed", model.id)
        await model.backend.aclose()


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")
