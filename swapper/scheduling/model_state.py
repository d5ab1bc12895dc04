"""The state the coordinator keeps per model: its status machine and its record."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from swapper.backends.contract import Backend, BackendHandle
from swapper.scheduling.logbook import ModelLog

__all__ = ["TRANSITIONS", "ModelRecord", "ModelStatus", "Waiter"]


class ModelStatus(enum.StrEnum):
    """Where a model is in its lifecycle."""

    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
    LOADED = "LOADED"
    UNLOADING = "UNLOADING"
    #: The process lives with its weights off the GPU (vLLM sleep mode); waking is fast.
    SLEEPING = "SLEEPING"
    FAILED = "FAILED"


_S = ModelStatus
#: Every legal edge of the model state machine; anything else is a bug and is refused.
TRANSITIONS: dict[ModelStatus, frozenset[ModelStatus]] = {
    # a request or an admin load starts it; a failed preflight check (file missing) → FAILED
    _S.UNLOADED: frozenset({_S.LOADING, _S.FAILED}),
    # ready → LOADED; died, timed out or start failed → FAILED; stopped while loading → UNLOADING
    _S.LOADING: frozenset({_S.LOADED, _S.FAILED, _S.UNLOADING}),
    # swapped out, unloaded or shut down → UNLOADING; the process died → FAILED
    _S.LOADED: frozenset({_S.UNLOADING, _S.FAILED}),
    # the process is gone → UNLOADED; or it was put to sleep and lives on → SLEEPING
    _S.UNLOADING: frozenset({_S.UNLOADED, _S.SLEEPING}),
    # woken (or restarted) for a request → LOADING; its memory is needed → UNLOADING;
    # the sleeping process died → FAILED
    _S.SLEEPING: frozenset({_S.LOADING, _S.UNLOADING, _S.FAILED}),
    # the next request retries; an admin unload clears the failure
    _S.FAILED: frozenset({_S.LOADING, _S.UNLOADED}),
}


@dataclass(eq=False)
class ModelRecord:
    """Everything the coordinator knows about one configured model."""

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
    #: Consecutive failed starts, and when (monotonic) a backed-off model may be tried again.
    failures: int = 0
    retry_at: float | None = None
    #: A backend built from a reloaded config, swapped in when the running one stops.
    pending: Backend | None = None
    #: Removed from the config by a reload; it unloads once idle and is then forgotten.
    removed: bool = False
    probing: bool = False
    #: Why the next load happens when it is not a plain request: "crashed" or "reload".
    restart_reason: str | None = None
    load_started: float = 0.0
    unload_started: float = 0.0
    log: ModelLog = field(default_factory=ModelLog)
    #: Unloads the model when it has been idle for its ttl.
    idle_timer: asyncio.TimerHandle | None = None
    #: Takes no new requests and unloads once idle (operator unload, ttl, reload).
    draining: bool = False
    #: Chosen to make room for ``evicting_for``; admits a bounded number of overtakers.
    evicting_for: ModelRecord | None = None
    #: Cuts off a chosen model's in-flight requests after swapper.drain_timeout.
    drain_timer: asyncio.TimerHandle | None = None
    #: Why in-flight requests were cut off, for their error message.
    cut_reason: str | None = None
    #: The next unload must stop the process, not put it to sleep.
    stop_fully: bool = False
    #: While UNLOADING: it will end asleep; it was asleep (so it holds no slot, only memory).
    unload_to_sleep: bool = False
    leaving_sleep: bool = False
    #: VRAM in MiB measured while LOADED / while SLEEPING (None: not measured).
    vram_mb: float | None = None
    sleep_vram_mb: float | None = None
    #: NVML's used MiB without this model, and :attr:`Placement.gpu_changes` once its start (or
    #: wake) was counted: the fallback measurement where NVML cannot tell our processes apart.
    load_baseline: tuple[float, int] | None = None
    #: The swap that brings this model in: which model left for it, and when that began.
    swap_from: str | None = None
    swap_started: float | None = None
    #: Order in which models started loading (the most recent is the "active" one).
    started_seq: int = 0


@dataclass(eq=False)
class Waiter:
    """A request queued for a model that is not resident yet."""

    model: ModelRecord
    seq: int
    future: asyncio.Future[str]  # resolves to the backend's base URL on admission
    manual: bool = False  # an operator's load, not a client request
    redeemed: bool = False  # someone awaits it (and will release what it admits)
    abandoned: bool = False  # given up after admission: its in-flight slot was returned
