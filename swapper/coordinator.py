"""The swap coordinator: the one owner of model state.

Models take slots (``max_concurrent_models``: 1 in single-active mode) and VRAM (see
:mod:`swapper.placement`). A request *acquires* a lease on its model; the coordinator admits it
at once when that model is resident, or queues it and schedules loads and evictions so that:

* concurrent first requests for one model cause exactly one load;
* requests are served in arrival order across models: the first waiting request that does not
  fit chooses the models to evict (least recently used and idle first, pinned last), and
  requests for those may overtake it at most ``max_overtake`` times (anti-thrash batching with
  a bound, so no model starves);
* an eviction waits for the evicted model's in-flight requests, up to ``drain_timeout``, stops
  its process (SIGTERM, grace, SIGKILL, reaped) or puts it to sleep, waits for NVML to show the
  memory back, and only then starts the next one.

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
from swapper.placement import HOLDING_STATUSES, SLOT_STATUSES, GpuView, Placement
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

    @property
    def cut_reason(self) -> str | None:
        """Why the request was cut off (its model was evicted past drain_timeout), if it was."""
        return self._model.cut_reason

    @property
    def upstream_model(self) -> str | None:
        """The backend's own name for the model, when requests must be rewritten to it."""
        return self._model.backend.upstream_model()


class SwapCoordinator:
    """Owns every model's state and decides what is resident."""

    def __init__(self, config: Config, registry: BackendRegistry,
                 gpu: GpuView | None = None) -> None:
        self.config = config
        self.placement = Placement(config, gpu)
        self._registry = registry
        self._models: dict[str, ModelRecord] = {}
        #: Models removed by a reload that still hold a process until they unload.
        self._retired: set[ModelRecord] = set()
        for model_id in config.models:
            self._models[model_id] = self._new_model(model_id, config)
        self._names = self._name_index(config)
        #: Status changes, swaps, loads, unloads and queue changes, for metrics and /events.
        self.events = EventBus()
        #: Overtakes granted past the first blocked waiter (``_blocked_seq``) so far.
        self._overtaken = 0
        self._blocked_seq: int | None = None
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
        refusal = self.placement.refusal(model)
        if refusal is not None:
            raise ModelUnavailable(refusal)
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
        """Unload ``model_id`` once its in-flight requests finish; clears a FAILED state.

        A backend that can sleep is put to sleep; unloading a sleeping model stops it.
        """
        model = self._models[model_id]
        if model.status == ModelStatus.FAILED:
            self._transition(model, ModelStatus.UNLOADED)
        elif model.status == ModelStatus.SLEEPING:
            # Unloading a sleeping model stops its process (a first unload put it to sleep).
            self._start_unload(model, full=True)
        elif model.status in (ModelStatus.LOADING, ModelStatus.LOADED):
            model.draining = True
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
        self.placement.config = config  # budget, pinning and slots apply from the next decision
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

    def _all_models(self) -> list[ModelRecord]:
        return [*self._models.values(), *self._retired]

    def _holders(self) -> list[ModelRecord]:
        return [m for m in self._all_models() if m.status in HOLDING_STATUSES]

    @property
    def active_model(self) -> str | None:
        """The model that most recently took a slot and still holds it, if any."""
        holders = [m for m in self._all_models() if m.status in SLOT_STATUSES]
        return max(holders, key=lambda m: m.started_seq).id if holders else None

    @property
    def resident_models(self) -> list[str]:
        """Models holding a slot (loading, loaded or unloading), in the order they started."""
        holders = [m for m in self._all_models() if m.status in SLOT_STATUSES]
        return [m.id for m in sorted(holders, key=lambda m: m.started_seq)]

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
                "vram_mb": (model.sleep_vram_mb if model.status == ModelStatus.SLEEPING
                            else model.vram_mb if model.status == ModelStatus.LOADED else None),
                "predicted_vram_mb": round(self.placement.predicted_mb(model), 1),
                "pinned": self.placement.pinned(model),
            }
        placement = self.placement
        budget = placement.budget_mb
        return {"mode": self.config.swapper.mode, "active_model": self.active_model,
                "resident": self.resident_models,
                "max_concurrent_models": self.config.swapper.max_concurrent_models,
                "vram": {"budget_mb": None if budget is None else round(budget, 1),
                         "committed_mb": round(sum(placement.charge_mb(m)
                                                   for m in self._holders()), 1),
                         "learned_mb": placement.sizes.snapshot()},
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
        for model in self._all_models():
            if model.status in (ModelStatus.LOADED, ModelStatus.SLEEPING):
                self._transition(model, ModelStatus.UNLOADING)
            await self._stop_backend(model)
            if model.status == ModelStatus.UNLOADING:
                self._transition(model, ModelStatus.UNLOADED)

    # -- scheduling ---------------------------------------------------------------------------

    def _may_admit(self, model: ModelRecord) -> bool:
        """Fast path: the model is resident, takes requests, and no one it must let pass waits."""
        if (model.status != ModelStatus.LOADED or model.draining or model.queued
                or model.pending is not None or self._closing):
            return False
        return (model.evicting_for is None
                or self._overtaken < self.config.swapper.max_overtake)

    def _admit(self, model: ModelRecord) -> Lease:
        if model.evicting_for is not None:
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
            if self._waiters or model.draining or model.evicting_for is not None:
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
        if model.status == ModelStatus.LOADED and not model.in_flight and not model.queued:
            logger.info("%s idle for %gs (ttl); unloading", model.id, self._ttl(model))
            model.draining = True
            self._schedule()

    def _schedule(self) -> None:
        """Take every decision the current state allows; never awaits."""
        if self._closing:
            return
        self._place()
        for model in self._all_models():
            if model.status == ModelStatus.SLEEPING and (model.removed or model.pending):
                self._start_unload(model, full=True)  # a changed or removed model restarts
                continue
            if model.status != ModelStatus.LOADED:
                continue  # a load or unload is running; its end calls us again
            if model.removed or model.pending is not None and model.queued:
                # Removed by a reload: unload once idle. Changed by a reload: restart on next use.
                model.draining = True
            if not model.draining:
                self._admit_queued(model)
            if model.in_flight == 0 and (model.draining or model.evicting_for is not None):
                self._start_unload(model)

    def _place(self) -> None:
        """Start the loads that fit, in arrival order; the first that does not picks evictions."""
        evictions: dict[ModelRecord, tuple[bool, ModelRecord]] = {}
        blocked: Waiter | None = None
        seen: set[ModelRecord] = set()
        for waiter in list(self._waiters):
            model = waiter.model
            if model in seen or waiter.future.done():
                continue
            seen.add(model)
            if model.status in (ModelStatus.LOADING, ModelStatus.LOADED):
                continue
            if model.status == ModelStatus.UNLOADING:
                blocked = waiter  # it loads again once it is out
                break
            plan = self.placement.plan(model, self._holders())
            if plan.refuse is not None:  # the budget shrank under it (a reload)
                self._fail_waiters(model, ModelUnavailable(plan.refuse))
                continue
            if plan.start:
                self._start_load(model, manual=waiter.manual)
                continue
            blocked = waiter
            for eviction in plan.evict:
                evictions[eviction.model] = (eviction.full, model)
            break
        seq = blocked.seq if blocked is not None else None
        if seq != self._blocked_seq:
            self._blocked_seq, self._overtaken = seq, 0
        for model in self._all_models():
            chosen = evictions.get(model)
            if chosen is None:
                if model.evicting_for is not None and model.status == ModelStatus.LOADED:
                    model.evicting_for, model.stop_fully = None, False
                    self._disarm_drain(model)
                continue
            full, target = chosen
            model.stop_fully = model.stop_fully or full
            if model.status == ModelStatus.SLEEPING:
                target.swap_from = target.swap_from or model.id
                self._start_unload(model, full=True)
                continue
            model.evicting_for = target
            if model.in_flight and model.drain_timer is None:
                model.drain_timer = asyncio.get_running_loop().call_later(
                    self.config.swapper.drain_timeout, self._drain_expired, model)

    @staticmethod
    def _disarm_drain(model: ModelRecord) -> None:
        if model.drain_timer is not None:
            model.drain_timer.cancel()
            model.drain_timer = None

    def _drain_expired(self, model: ModelRecord) -> None:
        """An evicted model's requests ran past drain_timeout: cut them off, with a reason."""
        model.drain_timer = None
        target = model.evicting_for
        if target is None or model.status != ModelStatus.LOADED or not model.in_flight:
            return
        timeout = self.config.swapper.drain_timeout
        model.cut_reason = (
            f"Model {model.id!r} was unloaded to make room for {target.id!r}: its requests did "
            f"not finish within swapper.drain_timeout ({timeout:g}s)")
        logger.warning("%s: %d request(s) still running after drain_timeout (%gs); cutting "
                       "them off to load %s", model.id, model.in_flight, timeout, target.id)
        self._start_unload(model)

    def _admit_queued(self, model: ModelRecord) -> None:
        """Admit waiters for a resident model: earlier arrivals freely, later ones up to the bound."""
        first_other = self._blocked_seq if model.evicting_for is not None else None
        bound = self.config.swapper.max_overtake
        for waiter in list(self._waiters):
            if waiter.model is not model or waiter.future.done():
                continue  # another model's, or cancelled: its task drops it when it resumes
            if first_other is not None and waiter.seq > first_other:
                if self._overtaken >= bound:
                    return
                self._overtaken += 1
            self._waiters.remove(waiter)
            model.queued -= 1
            model.in_flight += 1
            self._disarm_idle(model)
            self._queue_changed(model)
            assert model.handle is not None
            waiter.future.set_result(model.handle.base_url)

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
            model.loaded_at = None
            model.handle = None
        elif new == ModelStatus.UNLOADED:
            model.loaded_at = None
            model.handle = None
        if new in (ModelStatus.FAILED, ModelStatus.UNLOADED, ModelStatus.SLEEPING):
            model.draining = model.stop_fully = False
            model.vram_mb = None
            model.unloaded.set()  # no process serves it any more
        if new in (ModelStatus.FAILED, ModelStatus.UNLOADED):
            model.sleep_vram_mb = None
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
        if model.swap_started is None:
            model.swap_started = model.load_started
        reason = "manual" if manual else model.restart_reason or "request"
        model.restart_reason = None
        model.started_seq = next(self._seq)
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
        sleep = (model.backend.can_sleep and not asleep and not full and not model.stop_fully
                 and not model.removed and model.pending is None and not self._closing)
        charge = self.placement.charge_mb(model)
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
                    await self.placement.wait_for_memory(model, self.placement.predicted_mb(model))
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
        self.events.emit("swap", **{"from": model.swap_from, "to": model.id, "reason": reason,
                                    "seconds": now - (model.swap_started or started)})
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
        extra = self.placement.predicted_mb(model) - self.placement.sleep_mb(model)
        await self.placement.wait_for_memory(model, extra)
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
            gpu = self.placement.gpu
            if measured is None and gpu is not None and handle.pid is not None:
                measured = await asyncio.to_thread(gpu.process_memory_mb, handle.pid)
        except Exception:  # noqa: BLE001 - a failed measurement leaves the estimate in use
            logger.exception("%s: measuring VRAM failed", model.id)
            return
        if not measured or model.handle is not handle or model.status != ModelStatus.LOADED:
            return
        model.vram_mb = measured
        logger.info("%s holds %.0f MiB of VRAM", model.id, measured)
        entry = model.backend.entry
        if self.placement.sizes.record(model.id, entry, measured):
            await asyncio.to_thread(self.placement.sizes.save)

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
        """Notice a backend that dies while resident (or asleep)."""
        reason = await model.backend.wait_exit(handle)
        if model.handle is not handle or model.status not in (ModelStatus.LOADED,
                                                              ModelStatus.SLEEPING):
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
        if model.status in (ModelStatus.LOADED, ModelStatus.SLEEPING):
            self._transition(model, ModelStatus.FAILED, error=reason)
            model.restart_reason = "crashed"
        self._schedule()

    async def _unload(self, model: ModelRecord, sleep: bool, charge: float) -> None:
        placement = self.placement
        used_before = (await asyncio.to_thread(placement.used_now_mb)
                       if placement.total_mb is not None else None)
        if sleep and await self._sleep(model):
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
        self.events.emit("unloaded", model=model.id, seconds=seconds, sleeping=sleep and
                         model.status == ModelStatus.SLEEPING)
        self._schedule()

    async def _sleep(self, model: ModelRecord) -> bool:
        """Put a backend to sleep and measure what it still holds; False when it failed."""
        handle = model.handle
        assert handle is not None
        try:
            await model.backend.sleep(handle)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot sleep is stopped instead
            logger.warning("%s: sleep failed (%s); stopping it instead", model.id, exc)
            return False
        gpu = self.placement.gpu
        if gpu is not None and handle.pid is not None and self.placement.total_mb is not None:
            model.sleep_vram_mb = await asyncio.to_thread(gpu.process_memory_mb, handle.pid)
        return True

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
