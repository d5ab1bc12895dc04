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
import itertools
import logging
import math
import time
from typing import Any

from swapper.backend import Backend, BackendHandle, BackendSettings
from swapper.config import Config
from swapper.errors import ModelNotFound, ModelUnavailable, QueueFull, ServiceUnavailable
from swapper.events import EventBus
from swapper.logbook import ModelLog
from swapper.model_state import TRANSITIONS, ModelRecord, ModelStatus, Waiter
from swapper.plugins import BackendRegistry

__all__ = ["Lease", "ModelStatus", "SwapCoordinator"]

logger = logging.getLogger("swapper.coordinator")

#: Readiness polling: first probe after this many seconds, backing off to at most the cap.
_POLL_FIRST = 0.01
_POLL_CAP = 0.1
_POLL_FACTOR = 1.5
#: Starts tried when a backend loses its port to another process between pick and bind.
_PORT_ATTEMPTS = 3


class _BackendExited(Exception):
    """The backend process ended while it was loading."""


class Lease:
    """Permission to send one request to a resident model; release it when the response ends."""

    __slots__ = ("_coordinator", "_model", "base_url", "max_connections", "released")

    def __init__(self, coordinator: SwapCoordinator, model: ModelRecord, base_url: str) -> None:
        self._coordinator = coordinator
        self._model = model
        self.base_url = base_url
        handle = model.handle
        self.max_connections = handle.max_connections if handle else None
        self.released = False

    @property
    def model_id(self) -> str:
        """The model this lease is for."""
        return self._model.id

    def release(self, *, used: bool = True) -> None:
        """End the request (idempotent); ``used=False`` leaves ``last_used`` alone."""
        if not self.released:
            self.released = True
            self._coordinator._release(self._model, used=used)

    def backend_silent(self) -> None:
        """The backend missed ``timeouts.read``: have the coordinator check whether it froze."""
        self._coordinator._check_frozen(self._model, self.base_url)


class SwapCoordinator:
    """Owns every model's state and decides what is resident."""

    def __init__(self, config: Config, registry: BackendRegistry) -> None:
        self.config = config
        self._registry = registry
        self._models: dict[str, ModelRecord] = {}
        #: Models removed by a reload that still hold a process until they unload.
        self._retired: set[ModelRecord] = set()
        for model_id in config.models:
            self._models[model_id] = self._new_model(model_id, config)
        self._names = self._name_index(config)
        #: Status changes, swaps, loads, unloads and queue changes, for metrics and /events.
        self.events = EventBus()
        #: The start of the swap under way and the model it unloads (for ``swap`` events).
        self._swap_started: float | None = None
        self._swap_from: str | None = None
        self._active: ModelRecord | None = None
        self._load_reason = "request"
        self._draining = False
        self._overtaken = 0
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_waiters: list[tuple[ModelRecord, frozenset[ModelStatus], asyncio.Future[None]]] = []
        self._closing = False

    def _make_backend(self, model_id: str, config: Config) -> Backend:
        entry = config.models[model_id]
        settings = BackendSettings(
            gpu_enabled=config.swapper.gpu_enabled,
            metal_acceleration=config.swapper.metal_acceleration,
            stop_timeout=config.swapper.stop_timeout,
        )
        return self._registry.backends[entry.backend](model_id, entry, settings)

    def _new_model(self, model_id: str, config: Config) -> ModelRecord:
        model = ModelRecord(id=model_id, backend=self._make_backend(model_id, config))
        model.backend.log_sink = model.log.append
        model.unloaded.set()
        return model

    @staticmethod
    def _name_index(config: Config) -> dict[str, str]:
        return {name: mid for mid, e in config.models.items() for name in (mid, *e.aliases)}

    # -- public API -------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The model id for an id or alias; ModelNotFound otherwise."""
        try:
            return self._names[name]
        except KeyError:
            raise ModelNotFound(f"The model {name!r} does not exist") from None

    async def acquire(self, model_id: str, *, manual: bool = False) -> Lease:
        """Wait until ``model_id`` is resident and admitted; the caller must release the lease.

        ``manual`` marks an operator's load (the swap's reason), not a client request.
        """
        return await self.redeem(self.enqueue(model_id, manual=manual))

    def enqueue(self, model_id: str, *, manual: bool = False) -> Lease | Waiter:
        """Admit now (a Lease) or take a place in the queue (a Waiter for :meth:`redeem`).

        Refusals — unknown model, shutting down, backing off, queue full — are raised here,
        before the caller commits to an answer (a stream's 200 goes out only after this).
        """
        if self._closing:
            raise ServiceUnavailable("swapper is shutting down")
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotFound(f"The model {model_id!r} does not exist")
        if self._may_admit(model):
            return self._admit(model)
        if model.retry_at is not None:
            remaining = model.retry_at - time.monotonic()
            if remaining > 0:
                raise ModelUnavailable(
                    f"Model {model_id!r} is backing off after {model.failures} failed starts "
                    f"({model.last_error}); next try in {remaining:.0f}s",
                    retry_after=math.ceil(remaining),
                )
        if len(self._waiters) >= self.config.swapper.max_queue:
            raise QueueFull(
                f"{len(self._waiters)} requests are already waiting for models "
                f"(swapper.max_queue); retry shortly"
            )
        waiter = Waiter(model, next(self._seq), asyncio.get_running_loop().create_future(), manual)
        self._waiters.append(waiter)
        model.queued += 1
        self._queue_changed(model)
        self._schedule()
        return waiter

    async def redeem(self, ticket: Lease | Waiter) -> Lease:
        """The lease for a ticket from :meth:`enqueue`, once its model is resident."""
        if isinstance(ticket, Lease):
            return ticket
        ticket.redeemed = True
        model = ticket.model
        try:
            base_url = await ticket.future
        except asyncio.CancelledError:
            self.abandon(ticket)
            raise
        return Lease(self, model, base_url)

    def abandon(self, ticket: Lease | Waiter) -> None:
        """Give up a ticket whose request will not be sent (the client left); idempotent."""
        if isinstance(ticket, Lease):
            ticket.release(used=False)
            return
        future = ticket.future
        if future.done() and not future.cancelled() and future.exception() is None:
            if not ticket.abandoned:
                ticket.abandoned = True
                self._release(ticket.model, used=False)  # admitted just as the client went away
        elif not future.done() or future.cancelled():
            future.cancel()  # (a cancelled awaiting task has cancelled it already)
            self._drop_waiter(ticket)
            self._schedule()

    def admits_now(self, model_id: str) -> bool:
        """True when a request for ``model_id`` would be admitted without waiting."""
        model = self._models.get(model_id)
        return model is not None and self._may_admit(model)

    async def load(self, model_id: str) -> None:
        """Make ``model_id`` resident (swapping as a request would) and return once it is.

        An operator's load retries at once, even while the model backs off after failures.
        """
        self._models[model_id].retry_at = None
        lease = await self.acquire(model_id, manual=True)
        lease.release(used=False)  # an operator's load is not a use

    async def unload(self, model_id: str) -> None:
        """Unload ``model_id`` once its in-flight requests finish; clears a FAILED state."""
        model = self._models[model_id]
        if model.status == ModelStatus.FAILED:
            self._transition(model, ModelStatus.UNLOADED)
        elif model is self._active and model.status != ModelStatus.UNLOADING:
            self._draining = True
            self._schedule()
        await model.unloaded.wait()

    def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply a new, already validated config without disturbing what did not change.

        Unchanged models keep running, mid-request included. A changed model keeps serving
        until its next request, which restarts it with the new entry. A removed model stops
        taking requests and unloads once idle. Service settings apply at once.
        """
        old = self.config
        self.config = config
        backend_settings_changed = (
            (old.swapper.gpu_enabled, old.swapper.metal_acceleration, old.swapper.stop_timeout)
            != (config.swapper.gpu_enabled, config.swapper.metal_acceleration,
                config.swapper.stop_timeout))
        summary: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "unchanged": []}
        for model_id in [m for m in self._models if m not in config.models]:
            model = self._models.pop(model_id)
            model.removed = True
            self._fail_waiters(model, ModelNotFound(f"The model {model_id!r} was removed from the config"))
            if model.handle is not None:
                self._retired.add(model)
            summary["removed"].append(model_id)
        for model_id, entry in config.models.items():
            model = self._models.get(model_id)
            if model is None:
                self._models[model_id] = self._new_model(model_id, config)
                summary["added"].append(model_id)
            elif entry == old.models[model_id] and not backend_settings_changed:
                summary["unchanged"].append(model_id)
            else:
                backend = self._make_backend(model_id, config)
                backend.log_sink = model.log.append
                if model.handle is None and model.status in (ModelStatus.UNLOADED, ModelStatus.FAILED):
                    self._spawn(model.backend.aclose(), f"close:{model_id}")
                    model.backend, model.failures, model.retry_at = backend, 0, None
                else:
                    model.pending = backend  # swapped in when the running process stops
                summary["changed"].append(model_id)
        self._names = self._name_index(config)
        logger.info("config reloaded from %s: %s", config.path,
                    ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no model changed")
        self._schedule()
        return summary

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
                "last_used": _iso(model.last_used),
                "failures": model.failures,
                "retry_at": _iso(None if model.retry_at is None
                                 else time.time() + model.retry_at - time.monotonic()),
            }
        return {"mode": self.config.swapper.mode, "active_model": self.active_model,
                "models": models}

    def model_log(self, model_id: str) -> ModelLog:
        """The ring buffer of one model's backend output."""
        return self._models[model_id].log

    def resident_pids(self) -> dict[str, int]:
        """Backend pids by model id, for models that hold a process."""
        return {m.id: m.handle.pid for m in self._models.values()
                if m.handle is not None and m.handle.pid is not None}

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
        for model in [*self._models.values(), *self._retired]:
            if model.status == ModelStatus.LOADED:
                self._transition(model, ModelStatus.UNLOADING)
            await self._stop_backend(model)
            if model.status == ModelStatus.UNLOADING:
                self._transition(model, ModelStatus.UNLOADED)
        self._active = None

    # -- scheduling ---------------------------------------------------------------------------

    def _others_waiting(self, model: ModelRecord) -> bool:
        return len(self._waiters) > model.queued

    def _may_admit(self, model: ModelRecord) -> bool:
        """Fast path: the model is resident and no swap is due."""
        return (
            model is self._active
            and model.status == ModelStatus.LOADED
            and not self._draining
            and model.queued == 0
            and model.pending is None
            and not self._closing
            and (not self._others_waiting(model) or self._overtaken < self.config.swapper.max_overtake)
        )

    def _admit(self, model: ModelRecord) -> Lease:
        if self._others_waiting(model):
            self._overtaken += 1
        model.in_flight += 1
        self._disarm_idle(model)
        assert model.handle is not None
        return Lease(self, model, model.handle.base_url)

    def _drop_waiter(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            waiter.model.queued -= 1
            self._queue_changed(waiter.model)

    def _queue_changed(self, model: ModelRecord) -> None:
        if self.events.subscribed:
            self.events.emit("queue", model=model.id, queued=model.queued,
                             in_flight=model.in_flight)

    def _release(self, model: ModelRecord, *, used: bool = True) -> None:
        model.in_flight -= 1
        if used:
            model.last_used = time.time()
        self._queue_changed(model)
        if model.in_flight == 0:
            self._arm_idle(model)
        if model.in_flight == 0 and (self._waiters or self._draining):
            self._schedule()

    def _ttl(self, model: ModelRecord) -> float:
        ttl = self.config.models[model.id].ttl if model.id in self.config.models else None
        return self.config.swapper.default_ttl if ttl is None else ttl

    def _arm_idle(self, model: ModelRecord) -> None:
        """Start the idle clock of a resident model with nothing in flight (ttl 0: never)."""
        ttl = self._ttl(model)
        if ttl <= 0 or model.status != ModelStatus.LOADED or model.in_flight:
            return
        self._disarm_idle(model)
        model.idle_timer = asyncio.get_running_loop().call_later(ttl, self._idle_expired, model)

    @staticmethod
    def _disarm_idle(model: ModelRecord) -> None:
        if model.idle_timer is not None:
            model.idle_timer.cancel()
            model.idle_timer = None

    def _idle_expired(self, model: ModelRecord) -> None:
        model.idle_timer = None
        if (model is self._active and model.status == ModelStatus.LOADED
                and not model.in_flight and not model.queued):
            logger.info("%s idle for %gs (ttl); unloading", model.id, self._ttl(model))
            self._draining = True
            self._schedule()

    def _schedule(self) -> None:
        """Take every decision the current state allows; never awaits."""
        if self._closing:
            return
        active = self._active
        if active is None:
            if self._waiters:
                head = self._waiters[0]
                self._start_load(head.model, manual=head.manual)
            return
        if active.status != ModelStatus.LOADED:
            return  # a load or unload is running; its end calls us again
        if active.removed or active.pending is not None and active.queued:
            # Removed by a reload: unload once idle. Changed by a reload: restart on next use.
            self._draining = True
        if not self._draining:
            self._admit_queued(active)
        if self._others_waiting(active) and active.queued == 0:
            # Requests for the resident model that were here first have been served; with
            # nothing of its own left to admit, idling would only delay the others.
            if active.in_flight == 0:
                self._draining = True
        if self._draining and active.in_flight == 0:
            self._start_unload(active)

    def _admit_queued(self, active: ModelRecord) -> None:
        """Admit waiters for the resident model: earlier arrivals freely, later ones up to the bound."""
        first_other = next((w.seq for w in self._waiters if w.model is not active), None)
        bound = self.config.swapper.max_overtake
        for waiter in list(self._waiters):
            if waiter.model is not active or waiter.future.done():
                continue  # another model's, or cancelled: its task drops it when it resumes
            if first_other is not None and waiter.seq > first_other:
                if self._overtaken >= bound:
                    self._draining = True
                    return
                self._overtaken += 1
            self._waiters.remove(waiter)
            active.queued -= 1
            active.in_flight += 1
            self._disarm_idle(active)
            self._queue_changed(active)
            assert active.handle is not None
            waiter.future.set_result(active.handle.base_url)
        if first_other is not None and self._overtaken >= bound:
            self._draining = True

    def _fail_waiters(self, model: ModelRecord, error: Exception) -> None:
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

    def _transition(self, model: ModelRecord, new: ModelStatus, *, error: str | None = None) -> None:
        """The only place a model's status changes; illegal edges are refused."""
        old = model.status
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"illegal transition for {model.id}: {old} -> {new}")
        model.status = new
        if new != ModelStatus.LOADED:
            self._disarm_idle(model)
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
        if new in (ModelStatus.FAILED, ModelStatus.UNLOADED):
            if self._active is model:
                self._active = None
                self._draining = False
            if model.pending is not None:  # a reloaded config takes effect from the next start
                self._spawn(model.backend.aclose(), f"close:{model.id}")
                model.backend, model.pending = model.pending, None
                model.failures, model.retry_at = 0, None
                model.restart_reason = "reload"
            if model.removed and new == ModelStatus.UNLOADED:
                self._retired.discard(model)
        log = logger.warning if new == ModelStatus.FAILED else logger.debug
        log("%s: %s -> %s%s", model.id, old, new, f" ({error})" if error else "")
        self.events.emit("status", model=model.id, status=new.value, previous=old.value,
                         pid=model.handle.pid if model.handle else None,
                         last_error=model.last_error)
        for watched, statuses, future in self._status_waiters:
            if watched is model and new in statuses and not future.done():
                future.set_result(None)

    def _start_load(self, model: ModelRecord, *, manual: bool = False) -> None:
        model.load_started = time.monotonic()
        if self._swap_started is None:
            self._swap_started = model.load_started
        reason = "manual" if manual else model.restart_reason or "request"
        model.restart_reason = None
        self._load_reason = reason
        self._active = model
        self._draining = False
        self._overtaken = 0
        self._transition(model, ModelStatus.LOADING)
        self._spawn(self._load(model), f"load:{model.id}")

    def _start_unload(self, model: ModelRecord) -> None:
        model.unload_started = time.monotonic()
        if self._waiters:  # unloading to make room: the swap starts now
            self._swap_started, self._swap_from = model.unload_started, model.id
        self._transition(model, ModelStatus.UNLOADING)
        self._spawn(self._unload(model), f"unload:{model.id}")

    async def _load(self, model: ModelRecord) -> None:
        timeout = self.config.swapper.model_swap_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self._start_until_ready(model)
        except asyncio.CancelledError:
            await self._stop_backend(model)
            self._transition(model, ModelStatus.UNLOADING)
            self._transition(model, ModelStatus.UNLOADED)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin's start is a failed load
            self._swap_started = self._swap_from = None
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
        self.events.emit("swap", **{"from": self._swap_from, "to": model.id,
                                    "reason": self._load_reason,
                                    "seconds": now - (self._swap_started or started)})
        self._swap_started = self._swap_from = None
        model.watcher = self._spawn(self._watch(model, model.handle), f"watch:{model.id}")
        self._schedule()
        self._arm_idle(model)  # loaded for a request that gave up, or by an operator

    async def _start_until_ready(self, model: ModelRecord) -> None:
        """Start the backend and wait for it; start again if another process took its port."""
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            model.handle = await model.backend.start()
            try:
                await self._wait_ready(model, model.handle)
                return
            except _BackendExited:
                if attempt == _PORT_ATTEMPTS or not model.backend.port_taken(model.handle):
                    raise
                logger.warning("%s: port %s was taken before the backend could bind it; "
                               "starting again on another port", model.id, model.handle.port)
                await self._stop_backend(model)

    def _load_failed(self, model: ModelRecord, reason: str) -> None:
        """FAILED, with exponential back-off once failures repeat; waiters get a 503."""
        model.failures += 1
        settings = self.config.swapper
        retry_after: int | None = None
        if model.failures >= settings.max_start_failures:
            exponent = model.failures - settings.max_start_failures
            delay = min(settings.retry_backoff * 2 ** exponent, settings.retry_backoff_max)
            model.retry_at = time.monotonic() + delay
            retry_after = math.ceil(delay)
            reason += f" ({model.failures} failed starts in a row; next try in {delay:g}s)"
        self._transition(model, ModelStatus.FAILED, error=f"load failed: {reason}")
        self._fail_waiters(model, ModelUnavailable(f"Model {model.id!r} failed to load: {reason}",
                                                   retry_after=retry_after))
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
        """Notice a backend that dies while resident."""
        reason = await model.backend.wait_exit(handle)
        if model.handle is not handle or model.status != ModelStatus.LOADED:
            return  # we stopped it ourselves
        logger.error("%s: backend died unexpectedly: %s", model.id, reason)
        model.watcher = None
        await self._fail_resident(model, f"backend died: {reason}")

    def _check_frozen(self, model: ModelRecord, base_url: str) -> None:
        handle = model.handle
        if (handle is None or handle.base_url != base_url or model.probing
                or model.status != ModelStatus.LOADED):
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
            logger.error("%s: backend frozen (silent past timeouts.read, no health answer in "
                         "%gs); killing it", model.id, timeouts.health)
            await self._fail_resident(
                model, f"backend froze: silent for {timeouts.read:g}s (timeouts.read) and no "
                f"health answer within {timeouts.health:g}s; killed", kill=True)
        finally:
            model.probing = False

    async def _fail_resident(self, model: ModelRecord, reason: str, *, kill: bool = False) -> None:
        """A resident backend broke: make sure its process is gone, then mark it FAILED."""
        await self._stop_backend(model, kill=kill)
        if model.status == ModelStatus.LOADED:
            self._transition(model, ModelStatus.FAILED, error=reason)
            model.restart_reason = "crashed"
        self._schedule()

    async def _unload(self, model: ModelRecord) -> None:
        await self._stop_backend(model)
        self._transition(model, ModelStatus.UNLOADED)
        seconds = time.monotonic() - model.unload_started
        logger.info("%s unloaded in %.3fs", model.id, seconds)
        self.events.emit("unloaded", model=model.id, seconds=seconds)
        self._schedule()

    async def _stop_backend(self, model: ModelRecord, *, kill: bool = False) -> None:
        watcher, model.watcher = model.watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if model.handle is not None:
            try:
                if kill:
                    await model.backend.kill(model.handle)
                else:
                    await model.backend.stop(model.handle)
            except Exception:  # a plugin's stop failing must not wedge the coordinator
                logger.exception("%s: stopping the backend failed", model.id)
        await model.backend.aclose()


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")
