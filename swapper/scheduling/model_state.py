"""A model's status machine, the sub-states it carries, and a queued request."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swapper.scheduling.runtime import ModelRuntime

__all__ = [
    "EXIT_PHASES",
    "PHASES",
    "TRANSITIONS",
    "Eviction",
    "Exit",
    "ModelStatus",
    "Phase",
    "Waiter",
]


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


class Exit(enum.StrEnum):
    """How an UNLOADING model ends: its exit plan, fixed when the unload starts."""

    #: A serving process stops (→ UNLOADED); it holds its slot until it is gone.
    STOP = "stop"
    #: A serving process is put to sleep (→ SLEEPING); it keeps part of its memory.
    SLEEP = "sleep"
    #: A sleeping process stops (→ UNLOADED); it held no slot, only its sleeping memory.
    STOP_ASLEEP = "stop-asleep"


class Phase(enum.StrEnum):
    """The sub-state of a status that scheduling branches on (see :data:`PHASES`)."""

    #: Nothing more to say than the status.
    PLAIN = "plain"
    #: LOADED: takes requests.
    SERVING = "serving"
    #: LOADED (or LOADING): takes no new requests and unloads once idle (operator unload,
    #: ttl, reload).
    DRAINING = "draining"
    #: LOADED: chosen to make room (an :class:`Eviction`); admits a bounded number of
    #: overtakers, then unloads once idle or at its drain deadline.
    EVICTING = "evicting"
    #: UNLOADING, by its :class:`Exit` plan.
    STOPPING = "stopping"
    GOING_TO_SLEEP = "going-to-sleep"
    STOPPING_ASLEEP = "stopping-asleep"


_P = Phase
#: The phases each status may be in; :attr:`ModelRuntime.phase` is always one of these (the
#: runtime checks it at every transition, and the placement fuzz test checks every step).
PHASES: dict[ModelStatus, frozenset[Phase]] = {
    _S.UNLOADED: frozenset({_P.PLAIN}),
    # an operator's unload while it loads: it unloads once loaded
    _S.LOADING: frozenset({_P.PLAIN, _P.DRAINING}),
    _S.LOADED: frozenset({_P.SERVING, _P.DRAINING, _P.EVICTING}),
    _S.UNLOADING: frozenset({_P.STOPPING, _P.GOING_TO_SLEEP, _P.STOPPING_ASLEEP}),
    _S.SLEEPING: frozenset({_P.PLAIN}),
    _S.FAILED: frozenset({_P.PLAIN}),
}

#: The UNLOADING phase of each exit plan.
EXIT_PHASES: dict[Exit, Phase] = {
    Exit.STOP: _P.STOPPING,
    Exit.SLEEP: _P.GOING_TO_SLEEP,
    Exit.STOP_ASLEEP: _P.STOPPING_ASLEEP,
}


@dataclass(eq=False)
class Eviction:
    """A resident model chosen to make room for ``target``: the EVICTING sub-state."""

    #: The model it makes room for.
    target: ModelRuntime
    #: It must stop, not sleep (sleeping would not free enough).
    full: bool = False
    #: Cuts off its in-flight requests after swapper.drain_timeout.
    deadline: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class Waiter:
    """A request queued for a model that is not resident yet."""

    model: ModelRuntime
    seq: int
    future: asyncio.Future[str]  # resolves to the backend's base URL on admission
    manual: bool = False  # an operator's load, not a client request
    redeemed: bool = False  # someone awaits it (and will release what it admits)
    abandoned: bool = False  # given up after admission: its in-flight slot was returned
