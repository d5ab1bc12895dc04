"""The swap coordinator: the one owner of model state.

Models take slots (``max_concurrent_models``: 1 in single-active mode) and VRAM (see
:mod:`swapper.scheduling.placement`). A request *acquires* a lease on its model; the coordinator admits it
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
tasks (:mod:`swapper.scheduling.lifecycle`) that report back through ``_transition``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import time
from typing import Any

from swapper.backends.contract import Backend, BackendSettings
from swapper.backends.registry import BackendRegistry
from swapper.config import Config
from swapper.errors import (
    ModelNotFound,
    ModelUnavailable,
    QueueFull,
    ServiceUnavailable,
)
from swapper.scheduling.events import EventBus
from swapper.scheduling.lifecycle import ModelLifecycle
from swapper.scheduling.logbook import ModelLog
from swapper.scheduling.model_state import ModelRecord, ModelStatus, Waiter
from swapper.scheduling.placement import HOLDING_STATUSES, GpuView, Placement, holds_slot
from swapper.scheduling.snapshot import ModelLoad, ModelSnapshot, Snapshot, VramSnapshot

__all__ = ["Lease", "ModelStatus", "SwapCoordinator"]

logger = logging.getLogger("swapper.coordinator")


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

    async def backend_unreachable(self) -> None:
        """The backend refused or dropped the connection: wait until a crash is noticed."""
        await self._coordinator._settle_unreachable(self._model, self.base_url)

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

    @property
    def upstream_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Headers the backend needs on every request (the ``openai`` backend's api_key)."""
        return self._model.backend.upstream_headers()


class SwapCoordinator(ModelLifecycle):
    """Owns every model's state and decides what is resident."""

    def __init__(
        self, config: Config, registry: BackendRegistry, gpu: GpuView | None = None
    ) -> None:
        self.config = config
        self.placement = Placement(config, gpu)
        self._registry = registry
        self._models: dict[str, ModelRecord] = {}
        #: Models removed by a reload that still hold a process until they unload.
        self._retired: set[ModelRecord] = set()
        for model_id in config.models:
            self._models[model_id] = self._new_model(model_id, config)
        self._names = config.names
        #: Status changes, swaps, loads, unloads and queue changes, for metrics and /events.
        self.events = EventBus()
        #: Overtakes granted past the first blocked waiter (``_blocked_seq``) so far.
        self._overtaken = 0
        self._blocked_seq: int | None = None
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_waiters: list[
            tuple[ModelRecord, frozenset[ModelStatus], asyncio.Future[None]]
        ] = []
        self._closing = False
        #: TEMP keep_alive shim: idle ttl overrides by model id (replaced by H1's at merge).
        self._keep_alive: dict[str, float] = {}

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
        await self.preflight(model_id)
        return await self.redeem(self.enqueue(model_id, manual=manual))

    async def preflight(self, model_id: str) -> None:
        """Refuse at once (503) a model that would need a start its backend says cannot work.

        Checked before the request queues, so a model whose file or binary is missing never
        evicts the working one.
        """
        model = self._models.get(model_id)
        if model is None or model.status not in (ModelStatus.UNLOADED, ModelStatus.FAILED):
            return  # resident, loading or asleep: nothing to start from scratch
        problem = await model.backend.preflight()
        if problem is not None:
            error = f"cannot start: {problem}"
            if model.status == ModelStatus.UNLOADED:
                self._transition(model, ModelStatus.FAILED, error=error)
            model.last_error = error
            raise ModelUnavailable(f"Model {model_id!r} cannot start: {problem}")

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
        model = self._models.get(model_id)
        if model is None:  # removed by a reload since the name was resolved
            raise ModelNotFound(f"The model {model_id!r} does not exist")
        model.retry_at = None
        lease = await self.acquire(model_id, manual=True)
        lease.release(used=False)  # an operator's load is not a use

    async def unload(self, model_id: str) -> None:
        """Unload ``model_id`` once its in-flight requests finish; clears a FAILED state.

        A backend that can sleep is put to sleep; unloading a sleeping model stops it.
        A model a reload removed meanwhile is unloading already: wait for that.
        """
        model = self._models.get(model_id) or next(
            (m for m in self._retired if m.id == model_id), None
        )
        if model is None:
            return  # removed, and out already
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
            old.swapper.gpu_enabled,
            old.swapper.metal_acceleration,
            old.swapper.stop_timeout,
        ) != (
            config.swapper.gpu_enabled,
            config.swapper.metal_acceleration,
            config.swapper.stop_timeout,
        )
        summary: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "unchanged": []}
        for model_id in [m for m in self._models if m not in config.models]:
            model = self._models.pop(model_id)
            model.removed = True
            self._fail_waiters(
                model, ModelNotFound(f"The model {model_id!r} was removed from the config")
            )
            if model.status not in (ModelStatus.UNLOADED, ModelStatus.FAILED):
                # Loading (maybe without a process yet), loaded, unloading or asleep: it still
                # holds, or will hold, a process and memory until it is out.
                self._retired.add(model)
            summary["removed"].append(model_id)
        for model_id, entry in config.models.items():
            current = self._models.get(model_id)
            if current is None:
                self._models[model_id] = self._new_model(model_id, config)
                summary["added"].append(model_id)
            elif entry == old.models[model_id] and not backend_settings_changed:
                summary["unchanged"].append(model_id)
            else:
                backend = self._make_backend(model_id, config)
                backend.log_sink = current.log.append
                if current.handle is None and current.status in (
                    ModelStatus.UNLOADED,
                    ModelStatus.FAILED,
                ):
                    self._spawn(current.backend.aclose(), f"close:{model_id}")
                    current.backend, current.failures, current.retry_at = backend, 0, None
                else:
                    current.pending = backend  # swapped in when the running process stops
                summary["changed"].append(model_id)
        self._names = config.names
        logger.info(
            "config reloaded from %s: %s",
            config.path,
            ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no model changed",
        )
        self._schedule()
        return summary

    async def wait_for_status(self, model_id: str, *statuses: ModelStatus) -> None:
        """Return once ``model_id`` is in one of ``statuses`` (an event, not a poll)."""
        model = self._models[model_id]
        if model.status not in statuses:
            await self._next_status(model, frozenset(statuses))

    async def _next_status(self, model: ModelRecord, statuses: frozenset[ModelStatus]) -> None:
        """Wait for ``model``'s next transition into one of ``statuses``."""
        future = asyncio.get_running_loop().create_future()
        entry = (model, statuses, future)
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
        resident = self.resident_models
        return resident[-1] if resident else None

    @property
    def resident_models(self) -> list[str]:
        """Models holding a slot (loading, loaded or unloading), in the order they started."""
        holders = [m for m in self._all_models() if holds_slot(m)]
        return [m.id for m in sorted(holders, key=lambda m: m.started_seq)]

    def status(self) -> Snapshot:
        """Every model's state and placement's accounting, in raw values (see :mod:`swapper.scheduling.snapshot`)."""
        placement = self.placement
        models = {}
        for model in self._models.values():
            handle = model.handle
            models[model.id] = ModelSnapshot(
                status=model.status,
                backend=model.backend.name,
                pid=handle.pid if handle else None,
                port=handle.port if handle else None,
                loaded_at=model.loaded_at,
                last_error=model.last_error,
                in_flight=model.in_flight,
                queued=model.queued,
                last_used=model.last_used,
                failures=model.failures,
                retry_at=model.retry_at,
                vram_mb=(
                    model.sleep_vram_mb
                    if model.status == ModelStatus.SLEEPING
                    else model.vram_mb
                    if model.status == ModelStatus.LOADED
                    else None
                ),
                predicted_vram_mb=placement.predicted_mb(model),
                pinned=placement.pinned(model),
            )
        vram = VramSnapshot(
            budget_mb=placement.budget_mb,
            committed_mb=sum(placement.charge_mb(m) for m in self._holders()),
            learned_mb=placement.sizes.snapshot(),
        )
        return Snapshot(
            mode=self.config.swapper.mode,
            active_model=self.active_model,
            resident=self.resident_models,
            max_concurrent_models=self.config.swapper.max_concurrent_models,
            vram=vram,
            models=models,
            wall_time=time.time(),
            monotonic_time=time.monotonic(),
        )

    def loads(self) -> dict[str, ModelLoad]:
        """Each model's status, queued and in-flight requests: the cheap part of :meth:`status`."""
        return {m.id: ModelLoad(m.status, m.queued, m.in_flight) for m in self._models.values()}

    def model_log(self, model_id: str) -> ModelLog:
        """The ring buffer of one model's backend output."""
        return self._models[model_id].log

    def model_status(self, model_id: str) -> ModelStatus:
        """The current status of one model."""
        return self._models[model_id].status

    def begin_shutdown(self) -> None:
        """Refuse new work and answer every queued request "shutting down" now; idempotent.

        In-flight requests keep their backends until :meth:`close`.
        """
        self._closing = True
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.model.queued -= 1
            if not waiter.future.done():
                waiter.future.set_exception(ServiceUnavailable("swapper is shutting down"))

    async def close(self) -> None:
        """Refuse new work, fail queued requests and stop every backend."""
        self.begin_shutdown()
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
        if (
            model.status != ModelStatus.LOADED
            or model.draining
            or model.queued
            or model.pending is not None
            or self._closing
        ):
            return False
        return model.evicting_for is None or self._overtaken < self.config.swapper.max_overtake

    def _admit(self, model: ModelRecord) -> Lease:
        model.in_flight += 1
        if model.evicting_for is not None:
            self._overtaken += 1
            self._arm_drain(model)
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
            self.events.emit(
                "queue", model=model.id, queued=model.queued, in_flight=model.in_flight
            )

    def _release(self, model: ModelRecord, *, used: bool = True) -> None:
        model.in_flight -= 1
        if used:
            model.last_used = time.time()
        self._queue_changed(model)
        if model.in_flight == 0:
            self._arm_idle(model)
            if self._waiters or model.draining or model.evicting_for is not None:
                self._schedule()

    def keep_alive(self, model_id: str, seconds: float | None) -> None:
        """TEMP shim (replaced by H1's at merge): 0 unloads when idle, negative never unloads
        when idle, positive sets the idle ttl from now; None forgets the override."""
        model = self._models.get(model_id)
        if model is None:
            return
        if seconds is None:
            self._keep_alive.pop(model_id, None)
            self._disarm_idle(model)
            self._arm_idle(model)
            return
        # A tiny positive ttl fires as soon as the model is idle; 0 is "never" for _arm_idle.
        self._keep_alive[model_id] = 1e-6 if seconds == 0 else 0.0 if seconds < 0 else seconds
        if seconds < 0:
            self._disarm_idle(model)
        self._arm_idle(model)

    def _ttl(self, model: ModelRecord) -> float:
        if model.id in self._keep_alive:
            return self._keep_alive[model.id]
        ttl = self.config.models[model.id].ttl if model.id in self.config.models else None
        return self.config.swapper.default_ttl if ttl is None else ttl

    def _arm_idle(self, model: ModelRecord) -> None:
        """Start the idle clock of a resident model with nothing in flight (ttl 0: never)."""
        ttl = self._ttl(model)
        if ttl <= 0 or model.status != ModelStatus.LOADED or model.in_flight:
            return
        self._disarm_idle(model)
        model.idle_timer = asyncio.get_running_loop().call_later(ttl, self._idle_expired, model)

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
            if model.removed or (model.pending is not None and model.queued):
                # Removed by a reload: unload once idle. Changed by a reload: restart on next use.
                model.draining = True
            if not model.draining:
                self._admit_queued(model)
            if model.in_flight == 0 and (model.draining or model.evicting_for is not None):
                self._start_unload(model)
            elif model.evicting_for is not None:
                self._arm_drain(model)

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
            model.evicting_for = target
            if model.status == ModelStatus.SLEEPING:
                self._start_unload(model, full=True)  # nothing to drain: out at once

    def _arm_drain(self, model: ModelRecord) -> None:
        """Start the drain deadline of a model chosen for eviction that still serves requests."""
        if model.in_flight and model.drain_timer is None:
            model.drain_timer = asyncio.get_running_loop().call_later(
                self.config.swapper.drain_timeout, self._drain_expired, model
            )

    def _drain_expired(self, model: ModelRecord) -> None:
        """An evicted model's requests ran past drain_timeout: cut them off, with a reason."""
        model.drain_timer = None
        target = model.evicting_for
        if target is None or model.status != ModelStatus.LOADED or not model.in_flight:
            return
        timeout = self.config.swapper.drain_timeout
        model.cut_reason = (
            f"Model {model.id!r} was unloaded to make room for {target.id!r}: its requests did "
            f"not finish within swapper.drain_timeout ({timeout:g}s)"
        )
        logger.warning(
            "%s: %d request(s) still running after drain_timeout (%gs); cutting "
            "them off to load %s",
            model.id,
            model.in_flight,
            timeout,
            target.id,
        )
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

    async def _settle_unreachable(self, model: ModelRecord, base_url: str) -> None:
        """After a refused or reset connection: if the backend died, wait until that is noticed.

        The watcher marks a dead backend FAILED, and the next acquire restarts it; a backend
        still alive gets its request again on a fresh connection.
        """
        handle = model.handle
        if handle is None or handle.base_url != base_url or model.status != ModelStatus.LOADED:
            return  # noticed already: a restart (or another model) is on its way
        try:
            async with asyncio.timeout(self.config.timeouts.health):
                await model.backend.wait_exit(handle)
                while model.handle is handle and model.status == ModelStatus.LOADED:
                    await self._next_status(model, frozenset(ModelStatus))
        except TimeoutError:
            pass  # it lives: a closed pooled connection, not a crash

    def _next_seq(self) -> int:
        return next(self._seq)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
