"""One configured model at run time: its status machine, sub-states, timers and backend tasks.

A :class:`ModelRuntime` owns everything about one model that changes over time: its backend
(through a :class:`~swapper.scheduling.driver.BackendDriver`), the watcher of its process, its
idle and drain timers, its eviction and exit plan, and the one :meth:`ModelRuntime.transition`
through which its status changes. The coordinator decides *what* loads and unloads and when;
it drives runtimes through their public methods, and they report back through the small
:class:`~swapper.scheduling.host.RuntimeHost` interface (reschedule, spawn a task, a failed
load, a retired model).
"""

from __future__ import annotations

import asyncio
import logging
import time

from swapper.backends.contract import Backend, BackendHandle
from swapper.scheduling.driver import BackendDriver
from swapper.scheduling.events import EventBus
from swapper.scheduling.host import RuntimeHost
from swapper.scheduling.idle import IdleClock
from swapper.scheduling.logbook import ModelLog
from swapper.scheduling.model_state import (
    EXIT_PHASES,
    PHASES,
    TRANSITIONS,
    Eviction,
    Exit,
    ModelStatus,
    Phase,
)
from swapper.scheduling.placement import Placement
from swapper.scheduling.runtime_tasks import RuntimeTasks

__all__ = ["SLOT_STATUSES", "ModelRuntime"]

logger = logging.getLogger("swapper.coordinator")

_S = ModelStatus
#: Statuses that may take one of the ``max_concurrent_models`` slots (see ``holds_slot``).
SLOT_STATUSES = frozenset({_S.LOADING, _S.LOADED, _S.UNLOADING})
#: Statuses whose process holds VRAM.
HOLDING_STATUSES = SLOT_STATUSES | {_S.SLEEPING}


class ModelRuntime:
    """Everything about one configured model that changes while swapper runs."""

    def __init__(
        self,
        model_id: str,
        backend: Backend,
        host: RuntimeHost,
        placement: Placement,
        events: EventBus,
    ) -> None:
        self.id = model_id
        self.host = host
        self.placement = placement
        self.events = events
        self.log = ModelLog()
        self.driver = BackendDriver(model_id, backend, placement)
        backend.log_sink = self.log.append
        self.status = ModelStatus.UNLOADED
        self.loaded_at: float | None = None
        self.last_error: str | None = None
        #: Admitted requests not yet released, and requests queued for it (the coordinator's).
        self.in_flight = 0
        self.queued = 0
        self.last_used: float | None = None
        #: Set while no process serves it (UNLOADED, SLEEPING, FAILED).
        self.unloaded = asyncio.Event()
        self.unloaded.set()
        #: Consecutive failed starts, and when (monotonic) a backed-off model may be tried again.
        self.failures = 0
        self.retry_at: float | None = None
        #: A backend built from a reloaded config, swapped in when the running one stops.
        self.pending: Backend | None = None
        #: Removed from the config by a reload; it unloads once idle and is then forgotten.
        self.removed = False
        #: Why the next load happens when it is not a plain request: "crashed" or "reload".
        self.restart_reason: str | None = None
        self.load_started = 0.0
        self.unload_started = 0.0
        #: Takes no new requests and unloads once idle (operator unload, ttl, reload).
        self.draining = False
        #: Chosen to make room for another model (the EVICTING phase).
        self.eviction: Eviction | None = None
        #: While UNLOADING: how it ends.
        self.exit: Exit | None = None
        #: Why in-flight requests were cut off, for their error message.
        self.cut_reason: str | None = None
        #: VRAM in MiB measured while LOADED / while SLEEPING (None: not measured).
        self.vram_mb: float | None = None
        self.sleep_vram_mb: float | None = None
        #: The swap that brings this model in: which model left for it, and when that began.
        self.swap_from: str | None = None
        self.swap_started: float | None = None
        #: Order in which models started loading (the most recent is the "active" one).
        self.started_seq = 0
        #: The GPUs (NVML indexes) it is placed on while it holds memory, or was last placed on;
        #: ``(NO_GPU,)`` where no GPU is known; empty: none yet, or it runs on no GPU.
        self.gpus: tuple[int, ...] = ()
        #: Unloads the model when it has been idle for its ttl (or a client's keep_alive).
        self.idle = IdleClock(self)
        self._status_waiters: list[tuple[frozenset[ModelStatus], asyncio.Future[None]]] = []
        self.tasks = RuntimeTasks(self)

    # -- what it is -------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The backend serving (or about to serve) this model."""
        return self.driver.backend

    @property
    def handle(self) -> BackendHandle | None:
        """The running process, when there is one."""
        return self.driver.handle

    @property
    def phase(self) -> Phase:
        """The sub-state of :attr:`status` scheduling branches on (one of :data:`PHASES`)."""
        status = self.status
        if status == _S.LOADED:
            if self.draining:
                return Phase.DRAINING
            return Phase.SERVING if self.eviction is None else Phase.EVICTING
        if status == _S.LOADING and self.draining:
            return Phase.DRAINING  # an operator's unload while it loads: out once loaded
        if status == _S.UNLOADING:
            assert self.exit is not None
            return EXIT_PHASES[self.exit]
        return Phase.PLAIN

    @property
    def holds_slot(self) -> bool:
        """Loading, loaded, or on its way out from serving; a sleeping model being stopped
        holds memory only."""
        return self.status in SLOT_STATUSES and self.exit != Exit.STOP_ASLEEP

    @property
    def holds_memory(self) -> bool:
        """Its process holds (or is about to hold) VRAM."""
        return self.status in HOLDING_STATUSES

    @property
    def sleep_mb(self) -> float:
        """What the model holds once asleep."""
        if self.sleep_vram_mb is not None:
            return self.sleep_vram_mb
        return self.backend.sleep_residual_mb

    @property
    def charge_mb(self) -> float:
        """What the model holds (or is about to) now."""
        if self.status == _S.SLEEPING or self.exit == Exit.STOP_ASLEEP:
            return self.sleep_mb
        if self.status in SLOT_STATUSES:
            if self.status == _S.LOADED and self.vram_mb is not None:
                return self.vram_mb
            return self.placement.predicted_mb(self)
        return 0.0

    @property
    def mb_after_unload(self) -> float:
        """What an UNLOADING model will still hold once out (asleep) or 0 (stopped)."""
        return self.sleep_mb if self.exit == Exit.SLEEP else 0.0

    @property
    def must_stop(self) -> bool:
        """Chosen for an eviction that needs it stopped, not asleep."""
        return self.eviction is not None and self.eviction.full

    @property
    def shown_vram_mb(self) -> float | None:
        """The measured VRAM for the status document: asleep, loaded, else None."""
        if self.status == _S.SLEEPING:
            return self.sleep_vram_mb
        return self.vram_mb if self.status == _S.LOADED else None

    @property
    def concurrency_limit(self) -> int | None:
        """The most requests it serves at once (None: no limit)."""
        entry = self.host.config.models.get(self.id)
        return entry.concurrency_limit if entry is not None else None

    @property
    def at_limit(self) -> bool:
        """As many requests in flight as its ``concurrency_limit`` allows."""
        limit = self.concurrency_limit
        return limit is not None and self.in_flight >= limit

    @property
    def takes_requests(self) -> bool:
        """Resident, neither leaving nor changed by a reload, and under its limit."""
        return (
            self.status == _S.LOADED
            and not self.draining
            and self.pending is None
            and not self.at_limit
        )

    # -- the state machine ------------------------------------------------------------------

    def transition(self, new: ModelStatus, *, error: str | None = None) -> None:
        """The only place a model's status changes; illegal edges are refused."""
        old = self.status
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"illegal transition for {self.id}: {old} -> {new}")
        self.status = new
        if new != _S.LOADED:
            self.idle.disarm()
            self.clear_eviction()
        if new in (_S.LOADING, _S.UNLOADING):
            self.unloaded.clear()
        if new == _S.LOADING:
            self.last_error = None
        elif new == _S.LOADED:
            self.loaded_at = time.time()
            self.cut_reason = None
        elif new == _S.FAILED:
            self.last_error = error
            self.driver.handle = None
        elif new == _S.UNLOADED:
            self.driver.handle = None
        if new in (_S.FAILED, _S.UNLOADED, _S.SLEEPING):
            self.draining = False
            self.exit = None
            self.idle.keep_alive_s = None
            self.vram_mb = self.loaded_at = None
            self.unloaded.set()  # no process serves it any more
        if new in (_S.FAILED, _S.UNLOADED):
            self.sleep_vram_mb = None
            if self.pending is not None:  # a reloaded config takes effect from the next start
                self.host.spawn(self.backend.aclose(), f"close:{self.id}")
                self.driver.backend, self.pending = self.pending, None
                self.failures, self.retry_at = 0, None
                self.restart_reason = "reload"
            if self.removed:
                self.host.retired(self)
        if self.phase not in PHASES[new]:
            raise RuntimeError(f"undeclared phase for {self.id}: {new} {self.phase}")
        log = logger.warning if new == _S.FAILED else logger.debug
        log("%s: %s -> %s%s", self.id, old, new, f" ({error})" if error else "")
        handle = self.handle
        self.events.emit(
            "status",
            model=self.id,
            status=new.value,
            previous=old.value,
            pid=handle.pid if handle else None,
            last_error=self.last_error,
        )
        for statuses, future in self._status_waiters:
            if new in statuses and not future.done():
                future.set_result(None)

    async def next_status(self, statuses: frozenset[ModelStatus]) -> None:
        """Wait for the next transition into one of ``statuses`` (an event, not a poll)."""
        future = asyncio.get_running_loop().create_future()
        entry = (statuses, future)
        self._status_waiters.append(entry)
        try:
            await future
        finally:
            self._status_waiters.remove(entry)

    async def wait_for_status(self, *statuses: ModelStatus) -> None:
        """Return once the model is in one of ``statuses``."""
        if self.status not in statuses:
            await self.next_status(frozenset(statuses))

    # -- moving in and out ------------------------------------------------------------------

    def start_load(self, *, manual: bool = False) -> None:
        """LOADING: start (or wake) the backend; the load task reports back."""
        self.load_started = time.monotonic()
        if self.swap_started is None:
            self.swap_started = self.load_started
        reason = "manual" if manual else self.restart_reason or "request"
        self.restart_reason = None
        self.started_seq = self.host.next_seq()
        waking = self.status == _S.SLEEPING
        self.gpus = self.placement.take_gpus(self)
        # The backend is told its GPUs (CUDA_VISIBLE_DEVICES) only where real GPUs are known.
        self.backend.gpus = list(self.gpus) if self.placement.per_gpu else None
        self.transition(_S.LOADING)
        self.host.spawn(self.tasks.load(reason, waking), f"load:{self.id}")

    def start_unload(self, *, full: bool = False) -> None:
        """UNLOADING: asleep when the backend can sleep, else (or ``full``) stopped."""
        self.unload_started = time.monotonic()
        target = self.eviction.target if self.eviction is not None else None
        # (A sleeper stopped to start cold elsewhere makes room for itself: no swap to time.)
        if target is not None and target is not self and target.swap_started is None:
            # Unloading to make room: the swap starts now.
            target.swap_from, target.swap_started = self.id, self.unload_started
        asleep = self.status == _S.SLEEPING
        sleep = (
            self.backend.can_sleep
            and not asleep
            and not full
            and not self.must_stop
            and not self.removed
            and self.pending is None
            and not self.host.closing
        )
        charge = self.charge_mb
        self.exit = Exit.STOP_ASLEEP if asleep else Exit.SLEEP if sleep else Exit.STOP
        self.transition(_S.UNLOADING)
        self.host.spawn(self.tasks.unload(sleep, charge), f"unload:{self.id}")

    def drain(self) -> None:
        """Take no new requests; unload once the last in-flight one ends."""
        self.draining = True

    def retire(self) -> None:
        """Removed by a reload: it unloads once idle and is then forgotten."""
        self.removed = True

    def replace_backend(self, backend: Backend) -> None:
        """A reload changed the entry: use ``backend`` from the next start on."""
        backend.log_sink = self.log.append
        if self.handle is None and self.status in (_S.UNLOADED, _S.FAILED):
            self.host.spawn(self.backend.aclose(), f"close:{self.id}")
            self.driver.backend, self.failures, self.retry_at = backend, 0, None
        else:
            self.pending = backend  # swapped in when the running process stops

    async def stop_backend(self, *, kill: bool = False) -> None:
        """Stop its process (if any) and its watcher; the status is the caller's to change."""
        await self.tasks.stop_backend(kill=kill)

    async def shut_down(self) -> None:
        """Stop the backend for good (swapper is closing)."""
        if self.status in (_S.LOADED, _S.SLEEPING):
            self.exit = Exit.STOP_ASLEEP if self.status == _S.SLEEPING else Exit.STOP
            self.transition(_S.UNLOADING)
        await self.stop_backend()
        if self.status == _S.UNLOADING:
            self.transition(_S.UNLOADED)

    # -- requests ---------------------------------------------------------------------------

    def admit(self) -> str:
        """Count one more request in flight; the base URL to send it to."""
        self.in_flight += 1
        self.idle.disarm()
        assert self.handle is not None
        return self.handle.base_url

    def release(self, *, used: bool = True) -> None:
        """One request ended; ``used=False`` leaves ``last_used`` alone."""
        self.in_flight -= 1
        if used:
            self.last_used = time.time()
        if self.in_flight == 0:
            self.idle.arm()

    def check_frozen(self, base_url: str) -> None:
        """A request to it missed ``timeouts.read``: probe whether the backend froze."""
        self.tasks.check_frozen(base_url)

    async def settle_unreachable(self, base_url: str) -> None:
        """After a refused or reset connection: if the backend died, wait until that is noticed."""
        await self.tasks.settle_unreachable(base_url)

    # -- timers -----------------------------------------------------------------------------

    @property
    def idle_timer(self) -> asyncio.TimerHandle | None:
        """The idle clock's timer, while it runs."""
        return self.idle.timer

    def keep_alive(self, seconds: float | None) -> None:
        """A client's keep_alive (see :meth:`~swapper.scheduling.idle.IdleClock.keep_alive`)."""
        self.idle.keep_alive(seconds)

    def choose_for_eviction(self, target: ModelRuntime, *, full: bool) -> None:
        """Make room for ``target`` (stopped when ``full``, or when chosen so before)."""
        if self.eviction is None:
            self.eviction = Eviction(target, full)
        else:
            self.eviction.target = target
            self.eviction.full = self.eviction.full or full

    def clear_eviction(self) -> None:
        """No longer chosen to make room."""
        if self.eviction is not None and self.eviction.deadline is not None:
            self.eviction.deadline.cancel()
        self.eviction = None

    def arm_drain(self) -> None:
        """Start the drain deadline of a model chosen for eviction that still serves requests."""
        self.tasks.arm_drain()
