"""The coordinator's policy: the queue of waiting requests, admission with bounded overtaking,
and which models start and which make room for them.

Every decision here is synchronous and runs on the event loop (see
:mod:`swapper.scheduling.coordinator`); the runtimes carry the decisions out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools

from swapper.errors import ModelUnavailable
from swapper.scheduling.events import EventBus
from swapper.scheduling.host import RuntimeHost
from swapper.scheduling.model_state import ModelStatus, Waiter
from swapper.scheduling.placement import Placement
from swapper.scheduling.runtime import ModelRuntime

__all__ = ["Admission"]

_S = ModelStatus


class Admission:
    """Waiting requests in arrival order, and the decisions that serve them fairly."""

    def __init__(self, host: RuntimeHost, placement: Placement, events: EventBus) -> None:
        self.host = host
        self.placement = placement
        self.events = events
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._seq = itertools.count()
        #: Overtakes granted past the first blocked waiter (``_blocked_seq``) so far.
        self._overtaken = 0
        self._blocked_seq: int | None = None

    def __len__(self) -> int:
        return len(self._waiters)

    def waiting(self) -> list[Waiter]:
        """The queued requests, in arrival order."""
        return list(self._waiters)

    def next_seq(self) -> int:
        """The next number in arrival (and start) order."""
        return next(self._seq)

    # -- admission ----------------------------------------------------------------------------

    def may_admit(self, model: ModelRuntime) -> bool:
        """Fast path: the model takes requests, and no one it must let pass waits."""
        if not model.takes_requests or model.queued or self.host.closing:
            return False
        bound = self.host.config.swapper.max_overtake
        return model.eviction is None or self._overtaken < bound

    def admit(self, model: ModelRuntime) -> str:
        """Admit one request to ``model`` now; its base URL."""
        base_url = model.admit()
        if model.eviction is not None:
            self._overtaken += 1
            model.arm_drain()
        return base_url

    def enqueue(self, model: ModelRuntime, *, manual: bool) -> Waiter:
        """Queue a request for ``model``."""
        waiter = Waiter(model, self.next_seq(), asyncio.get_running_loop().create_future(), manual)
        self._waiters.append(waiter)
        model.queued += 1
        self.queue_changed(model)
        return waiter

    def drop(self, waiter: Waiter) -> None:
        """Take a waiter out of the queue (it was answered, or gave up)."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            waiter.model.queued -= 1
            self.queue_changed(waiter.model)

    def fail(self, model: ModelRuntime, error: Exception) -> None:
        """Answer every request waiting for ``model`` with ``error``."""
        for waiter in [w for w in self._waiters if w.model is model]:
            self.drop(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def fail_all(self, error: Exception) -> None:
        """Answer every waiting request with ``error`` (shutting down)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.model.queued -= 1
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def queue_changed(self, model: ModelRuntime) -> None:
        """Tell ``/events`` listeners (only: it is chatty) of a queue or in-flight change."""
        if self.events.subscribed:
            self.events.emit(
                "queue", model=model.id, queued=model.queued, in_flight=model.in_flight
            )

    # -- decisions ----------------------------------------------------------------------------

    def schedule(self, models: list[ModelRuntime]) -> None:
        """Take every decision the current state of ``models`` allows; never awaits."""
        self._place(models)
        for model in models:
            if model.status == _S.SLEEPING and (model.removed or model.pending):
                model.start_unload(full=True)  # a changed or removed model restarts
                continue
            if model.status != _S.LOADED:
                continue  # a load or unload is running; its end calls us again
            if model.removed or (model.pending is not None and model.queued):
                # Removed by a reload: unload once idle. Changed by a reload: restart on next use.
                model.drain()
            if not model.draining:
                self._admit_queued(model)
            if model.in_flight == 0 and (model.draining or model.eviction is not None):
                model.start_unload()
            elif model.eviction is not None:
                model.arm_drain()

    def _place(self, models: list[ModelRuntime]) -> None:
        """Start the loads that fit, in arrival order; the first that does not picks evictions."""
        evictions: dict[ModelRuntime, tuple[bool, ModelRuntime]] = {}
        blocked: Waiter | None = None
        seen: set[ModelRuntime] = set()
        for waiter in list(self._waiters):
            model = waiter.model
            if model in seen or waiter.future.done():
                continue
            seen.add(model)
            if model.status in (_S.LOADING, _S.LOADED):
                continue
            if model.status == _S.UNLOADING:
                blocked = waiter  # it loads again once it is out
                break
            plan = self.placement.plan(model, [m for m in models if m.holds_memory])
            if plan.refuse is not None:  # the budget shrank under it (a reload)
                self.fail(model, ModelUnavailable(plan.refuse))
                continue
            if plan.start:
                model.start_load(manual=waiter.manual)
                continue
            blocked = waiter
            for eviction in plan.evict:
                evictions[eviction.model] = (eviction.full, model)
            break
        seq = blocked.seq if blocked is not None else None
        if seq != self._blocked_seq:
            self._blocked_seq, self._overtaken = seq, 0
        for model in models:
            chosen = evictions.get(model)
            if chosen is None:
                if model.eviction is not None and model.status == _S.LOADED:
                    model.clear_eviction()
                continue
            full, target = chosen
            model.choose_for_eviction(target, full=full)
            if model.status == _S.SLEEPING:
                model.start_unload(full=True)  # nothing to drain: out at once

    def _admit_queued(self, model: ModelRuntime) -> None:
        """Admit waiters for a resident model: earlier arrivals freely, later ones up to the
        bound, and never more in flight than its concurrency_limit."""
        first_other = self._blocked_seq if model.eviction is not None else None
        bound = self.host.config.swapper.max_overtake
        for waiter in list(self._waiters):
            if waiter.model is not model or waiter.future.done():
                continue  # another model's, or cancelled: its task drops it when it resumes
            if model.at_limit:
                return
            if first_other is not None and waiter.seq > first_other:
                if self._overtaken >= bound:
                    return
                self._overtaken += 1
            self._waiters.remove(waiter)
            model.queued -= 1
            base_url = model.admit()
            self.queue_changed(model)
            waiter.future.set_result(base_url)
