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
  memory back, and only then starts the next one;
* a model with a ``concurrency_limit`` has at most that many requests in flight; the rest
  wait in the queue like any other.

All scheduling decisions are taken synchronously on the event loop, in
:meth:`Admission.schedule <swapper.scheduling.admission.Admission.schedule>`, so there is no
lock and no interleaving to reason about. Each model's
:class:`~swapper.scheduling.runtime.ModelRuntime` carries them out: its loads and unloads run as
tasks that report back through the coordinator's
:class:`~swapper.scheduling.host.RuntimeHost` methods.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
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
from swapper.scheduling.admission import Admission
from swapper.scheduling.events import EventBus
from swapper.scheduling.lease import Lease
from swapper.scheduling.logbook import ModelLog
from swapper.scheduling.model_state import ModelStatus, Waiter
from swapper.scheduling.placement import GpuView, Placement
from swapper.scheduling.runtime import ModelRuntime
from swapper.scheduling.snapshot import ModelLoad, Snapshot, model_snapshot, vram_snapshot

__all__ = ["Lease", "ModelStatus", "SwapCoordinator"]

logger = logging.getLogger("swapper.coordinator")


class SwapCoordinator:
    """Owns the queue and decides what is resident; each model's runtime does the moving."""

    def __init__(
        self, config: Config, registry: BackendRegistry, gpu: GpuView | None = None
    ) -> None:
        self.config = config
        self.placement = Placement(config, gpu)
        self._registry = registry
        #: Status changes, swaps, loads, unloads and queue changes, for metrics and /events.
        self.events = EventBus()
        #: The queue, admission and the start/evict decisions.
        self._admission = Admission(self, self.placement, self.events)
        self._models: dict[str, ModelRuntime] = {}
        #: Models removed by a reload that still hold a process until they unload.
        self._retired: set[ModelRuntime] = set()
        for model_id in config.models:
            self._models[model_id] = self._new_runtime(model_id, config)
        self._names = config.names
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def _make_backend(self, model_id: str, config: Config) -> Backend:
        entry = config.models[model_id]
        return self._registry.backends[entry.backend](model_id, entry, _backend_settings(config))

    def _new_runtime(self, model_id: str, config: Config) -> ModelRuntime:
        backend = self._make_backend(model_id, config)
        return ModelRuntime(model_id, backend, self, self.placement, self.events)

    # -- public API -------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The model id for an id or alias; ModelNotFound otherwise."""
        try:
            return self._names[name]
        except KeyError:
            raise ModelNotFound(f"The model {name!r} does not exist") from None

    def runtime(self, model_id: str) -> ModelRuntime:
        """The runtime of a configured model (KeyError if there is none)."""
        return self._models[model_id]

    def waiting(self) -> list[Waiter]:
        """The queued requests, in arrival order."""
        return self._admission.waiting()

    def background_tasks(self) -> list[asyncio.Task[Any]]:
        """The loads, unloads, watchers, probes and measurements running now."""
        return list(self._tasks)

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
                model.transition(ModelStatus.FAILED, error=error)
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
        if self._admission.may_admit(model):
            return Lease(self, model, self._admission.admit(model))
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
        if len(self._admission) >= self.config.swapper.max_queue:
            raise QueueFull(
                f"{len(self._admission)} requests are already waiting for models "
                f"(swapper.max_queue); retry shortly"
            )
        waiter = self._admission.enqueue(model, manual=manual)
        self._schedule()
        return waiter

    async def redeem(self, ticket: Lease | Waiter) -> Lease:
        """The lease for a ticket from :meth:`enqueue`, once its model is resident."""
        if isinstance(ticket, Lease):
            return ticket
        ticket.redeemed = True
        try:
            base_url = await ticket.future
        except asyncio.CancelledError:
            self.abandon(ticket)
            raise
        return Lease(self, ticket.model, base_url)

    def abandon(self, ticket: Lease | Waiter) -> None:
        """Give up a ticket whose request will not be sent (the client left); idempotent."""
        if isinstance(ticket, Lease):
            ticket.release(used=False)
            return
        future = ticket.future
        if future.done() and not future.cancelled() and future.exception() is None:
            if not ticket.abandoned:
                ticket.abandoned = True
                self.release(ticket.model, used=False)  # admitted just as the client went away
        elif not future.done() or future.cancelled():
            future.cancel()  # (a cancelled awaiting task has cancelled it already)
            self._admission.drop(ticket)
            self._schedule()

    def release(self, model: ModelRuntime, *, used: bool = True) -> None:
        """One admitted request to ``model`` ended (a :class:`Lease` calls this once)."""
        model.release(used=used)
        self._admission.queue_changed(model)
        if model.queued or (
            model.in_flight == 0
            and (len(self._admission) or model.draining or model.eviction is not None)
        ):
            self._schedule()

    def admits_now(self, model_id: str) -> bool:
        """True when a request for ``model_id`` would be admitted without waiting."""
        model = self._models.get(model_id)
        return model is not None and self._admission.may_admit(model)

    def keep_alive(self, model_id: str, seconds: float | None) -> None:
        """A client's keep_alive (Ollama's semantics) for ``model_id``, until it next unloads.

        ``0``: unload once no request is in flight (now, if idle); negative: never unload
        when idle (it can still be evicted for another model); positive: unload after that
        many idle seconds; None: back to the configured ttl.
        """
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotFound(f"The model {model_id!r} does not exist")
        model.keep_alive(seconds)

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
            model.transition(ModelStatus.UNLOADED)
        elif model.status == ModelStatus.SLEEPING:
            # Unloading a sleeping model stops its process (a first unload put it to sleep).
            model.start_unload(full=True)
        elif model.status in (ModelStatus.LOADING, ModelStatus.LOADED):
            model.drain()
            self._schedule()
        await model.unloaded.wait()

    def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply a new, already validated config without disturbing what did not change.

        Unchanged models keep running, mid-request included. A changed model keeps serving
        until its next request, which restarts it with the new entry. A removed model stops
        taking requests and unloads once idle. Service settings apply at once; a client's
        keep_alive gives way to the new ttl.
        """
        old = self.config
        self.config = config
        self.placement.config = config  # budget, pinning and slots apply from the next decision
        backend_settings_changed = _backend_settings(old) != _backend_settings(config)
        summary: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "unchanged": []}
        for model_id in [m for m in self._models if m not in config.models]:
            model = self._models.pop(model_id)
            model.retire()
            self._admission.fail(
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
                self._models[model_id] = self._new_runtime(model_id, config)
                summary["added"].append(model_id)
                continue
            current.keep_alive(None)
            if entry == old.models[model_id] and not backend_settings_changed:
                summary["unchanged"].append(model_id)
            else:
                current.replace_backend(self._make_backend(model_id, config))
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
        await self._models[model_id].wait_for_status(*statuses)

    def _all_models(self) -> list[ModelRuntime]:
        return [*self._models.values(), *self._retired]

    def _holders(self) -> list[ModelRuntime]:
        return [m for m in self._all_models() if m.holds_memory]

    @property
    def active_model(self) -> str | None:
        """The model that most recently took a slot and still holds it, if any."""
        resident = self.resident_models
        return resident[-1] if resident else None

    @property
    def resident_models(self) -> list[str]:
        """Models holding a slot (loading, loaded or unloading), in the order they started."""
        holders = [m for m in self._all_models() if m.holds_slot]
        return [m.id for m in sorted(holders, key=lambda m: m.started_seq)]

    def status(self) -> Snapshot:
        """Every model's state and placement's accounting, in raw values (see
        :mod:`swapper.scheduling.snapshot`)."""
        placement = self.placement
        models = {m.id: model_snapshot(m, placement) for m in self._models.values()}
        vram = vram_snapshot(placement, self._holders())
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
        self._admission.fail_all(ServiceUnavailable("swapper is shutting down"))

    async def close(self) -> None:
        """Refuse new work, fail queued requests and stop every backend."""
        self.begin_shutdown()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for model in self._all_models():
            await model.shut_down()

    # -- the runtimes' host (see RuntimeHost) -------------------------------------------------

    @property
    def closing(self) -> bool:
        """Shutting down: no new work, and unloads stop rather than sleep."""
        return self._closing

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a background task that :meth:`close` cancels."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def reschedule(self) -> None:
        """A runtime's state changed: take the decisions that allows."""
        self._schedule()

    def next_seq(self) -> int:
        """The next number in arrival/start order."""
        return self._admission.next_seq()

    def load_failed(self, runtime: ModelRuntime, error: Exception) -> None:
        """A load failed: its queued requests get ``error``."""
        self._admission.fail(runtime, error)
        self._schedule()

    def retired(self, runtime: ModelRuntime) -> None:
        """A model removed by a reload is out: forget it."""
        self._retired.discard(runtime)

    def _schedule(self) -> None:
        if not self._closing:
            self._admission.schedule(self._all_models())


def _backend_settings(config: Config) -> BackendSettings:
    """The service-wide settings every backend is built with."""
    return BackendSettings(
        gpu_enabled=config.swapper.gpu_enabled,
        metal_acceleration=config.swapper.metal_acceleration,
        stop_timeout=config.swapper.stop_timeout,
    )
