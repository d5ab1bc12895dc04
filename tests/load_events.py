"""swapper's ``/events`` stream, followed for the load test: swaps, single-active, and the swaps
and overtakes each queued request saw, rebuilt from the events in the order swapper sent them."""

from __future__ import annotations

import collections
import itertools
import json
import statistics
import threading
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["HOLDING", "EventLog"]

#: Statuses in which a model holds a backend process that serves or may serve requests.
HOLDING = frozenset({"LOADING", "LOADED", "UNLOADING"})


class EventLog:
    """swapper's ``/events``, read on a thread of its own so that a busy client loop cannot make
    it lag (swapper drops a slow subscriber's oldest events). Lost events are detected: every
    status event names the previous status, which must be the one last seen, and a model's
    ``queued`` moves by one at a time."""

    def __init__(self, url: str, on_progress: Callable[[], None]) -> None:
        self._url, self._on_progress = url, on_progress
        self._lock = threading.Lock()
        self._response: httpx.Response | None = None
        self._stopping = False
        self.subscribed = threading.Event()
        self.status: dict[str, str] = {}
        self.swaps: list[tuple[float, str | None, str, float]] = []  # time, from, to, seconds
        self.loaded_pids: list[tuple[str, int | None]] = []
        self.overlaps: list[str] = []  # moments two models held a backend
        #: Swaps each queued request waited, from joining the queue to its admission.
        self.waited: list[int] = []
        self.drops = 0  # waiters that left the queue without being admitted
        #: For each waiter that blocked the queue: later arrivals admitted from the queue past it.
        self.overtakes: collections.Counter[int] = collections.Counter()
        self._queue: dict[str, tuple[int, int]] = {}  # model: (queued, in_flight) last seen
        #: Per model, its waiters in arrival order: (place in the global arrival order, swaps
        #: seen when it joined).
        self._joined: dict[str, collections.deque[tuple[int, int]]] = collections.defaultdict(
            collections.deque
        )
        self._joins = 0
        self.lost: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with httpx.Client(base_url=self._url, timeout=httpx.Timeout(30, read=None)) as http:
                with http.stream("GET", "/events") as response:
                    self._response = response
                    kind = ""
                    for line in response.iter_lines():
                        if line.startswith("event: "):
                            kind = line[len("event: ") :]
                        elif line.startswith("data: "):
                            self._handle(kind, json.loads(line[len("data: ") :]))
        except BaseException as exc:  # noqa: BLE001 - reported by the test unless it stopped us
            if not self._stopping:
                self.error = exc
        finally:
            self.subscribed.set()

    def _handle(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            if kind == "snapshot":
                self.status = {mid: m["status"] for mid, m in data["models"].items()}
                self._queue = {
                    mid: (m["queued"], m["in_flight"]) for mid, m in data["models"].items()
                }
                self.subscribed.set()
            elif kind == "status":
                model, now = data["model"], data["status"]
                if self.status.get(model) != data["previous"]:
                    self.lost.append(
                        f"{model}: {data['previous']} -> {now}, last seen {self.status.get(model)}"
                    )
                self.status[model] = now
                holders = sorted(m for m, s in self.status.items() if s in HOLDING)
                if len(holders) > 1:
                    self.overlaps.append(f"{data['time']:.3f}: {holders} after {model} -> {now}")
                if now == "LOADED":
                    self.loaded_pids.append((model, data["pid"]))
            elif kind == "swap":
                self.swaps.append((data["time"], data["from"], data["to"], data["seconds"]))
            elif kind == "queue":
                self._queue_changed(data["model"], data["queued"], data["in_flight"])
        if kind == "swap":
            self._on_progress()

    def _queue_changed(self, model: str, queued: int, in_flight: int) -> None:
        """Follow one model's queue: a waiter joins (+1), is admitted (-1 with in_flight up) or
        leaves (-1, in_flight unchanged); a release changes in_flight only. Each step moves
        ``queued`` by at most one, and a model's waiters are admitted in their arrival order
        (Admission._admit_queued walks the queue in order), so the n-th join of a model
        is its n-th admission."""
        before_queued, before_in_flight = self._queue.get(model, (0, 0))
        self._queue[model] = (queued, in_flight)
        joined = self._joined[model]
        if queued == before_queued + 1:
            joined.append((self._joins, len(self.swaps)))
            self._joins += 1
        elif queued == before_queued - 1 and joined:
            place, at_join = joined.popleft()
            if in_flight <= before_in_flight:
                self.drops += 1
                return
            self.waited.append(len(self.swaps) - at_join)
            # With one slot, the oldest waiter for another model is the one swapper's _place
            # blocks on; a later arrival admitted while it waits overtakes it.
            others = [
                queue[0][0] for other, queue in self._joined.items() if other != model and queue
            ]
            if others and place > min(others):
                self.overtakes[min(others)] += 1
        elif queued != before_queued:
            self.lost.append(f"{model}: queued {before_queued} -> {queued}")

    def caught_up(self, status: dict[str, Any]) -> bool:
        """True once the events seen add up to this settled ``/status`` document."""
        with self._lock:
            return all(
                self.status.get(mid) == m["status"]
                and self._queue.get(mid, (0, 0)) == (m["queued"], m["in_flight"])
                for mid, m in status["models"].items()
            )

    def median_swap_s(self) -> float | None:
        """Median time a swap itself took (unload of the old model to the new one ready)."""
        with self._lock:
            return statistics.median(s for *_, s in self.swaps) if self.swaps else None

    def median_period_s(self) -> float | None:
        """Median time from one swap to the next: a swap plus the residency before it (its
        drain and generation included); None until a few periods were measured."""
        with self._lock:
            times = [t for t, *_ in self.swaps]
        periods = [b - a for a, b in itertools.pairwise(times)]
        return statistics.median(periods) if len(periods) >= 3 else None

    def stop(self) -> None:
        self._stopping = True
        if self._response is not None:
            self._response.close()  # wakes the reader from its blocking read
        self._thread.join(10)
