"""What happened, kept for a while: recent requests, swaps, loads, errors and per-minute samples.

Bounded ring buffers (the ``activity:`` section sizes them), served at ``GET /activity`` and
replayed first on ``/events``. The hot path pays one :meth:`Activity.request` call per request
(an append to a deque and two dict updates), made where the access-log line is written; token
counts come from what the exchange already holds (the last event of a stream, or a body already
read whole), never from parsing every chunk. Swaps, loads and failures come from the
coordinator's event bus; the sampler reads the coordinator and NVML (in a worker thread) once a
``sample_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from swapper.config import ActivitySettings
from swapper.scheduling.events import Event

if TYPE_CHECKING:
    from swapper.gpu import GpuMonitor
    from swapper.scheduling.coordinator import SwapCoordinator

__all__ = ["Activity", "Usage", "body_usage", "next_edge", "stream_usage"]

logger = logging.getLogger("swapper")

#: Events replayed on ``/events`` to a client that connects late (never ``queue``: chatty).
_HISTORY_TYPES = frozenset({"status", "swap", "loaded", "unloaded"})
#: Operators' reads (route templates): watching swapper is not activity worth keeping.
_QUIET = frozenset(
    {"/health", "/status", "/activity", "/events", "/metrics", "/ui", "/ui/", "unmatched"}
)
#: Bodies larger than this are not searched for token counts (embeddings, say).
_BODY_LIMIT = 256 * 1024
#: The tail of a stream searched for its final usage (the last two chunks read).
_TAIL_EVENTS = 4


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Anthropic's names.
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Timings(msgspec.Struct):
    #: Prompt tokens evaluated now; ``cache_n`` more were reused from the prompt cache.
    prompt_n: int | None = None
    cache_n: int | None = None
    predicted_n: int | None = None
    predicted_per_second: float | None = None


class _Reported(msgspec.Struct):
    usage: _Usage | None = None
    timings: _Timings | None = None


_DECODE = msgspec.json.Decoder(_Reported)


class Usage(msgspec.Struct, frozen=True):
    """Tokens a backend reported for one answer; tokens/s only from llama.cpp's ``timings``."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_s: float | None = None


def _usage_of(payload: bytes) -> Usage | None:
    try:
        reported = _DECODE.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    usage, timings = reported.usage, reported.timings
    if usage is None and timings is None:
        return None
    prompt = completion = speed = None
    if usage is not None:
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens
        completion = usage.completion_tokens
        if completion is None:
            completion = usage.output_tokens
    if timings is not None:
        if prompt is None and timings.prompt_n is not None:
            prompt = timings.prompt_n + (timings.cache_n or 0)
        completion = completion if completion is not None else timings.predicted_n
        speed = timings.predicted_per_second
    return Usage(prompt, completion, speed)


def body_usage(body: bytes) -> Usage | None:
    """Token counts from a whole JSON answer already in memory (``usage``, ``timings``)."""
    if len(body) > _BODY_LIMIT or not body.startswith(b"{"):
        return None
    return _usage_of(body)


def stream_usage(tail: bytes) -> Usage | None:
    """Token counts from the end of a server-sent event stream: the last events only."""
    found: Usage | None = None
    for block in tail.replace(b"\r\n", b"\n").rsplit(b"\n\n", _TAIL_EVENTS)[::-1]:
        for line in block.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            usage = _usage_of(line[5:].strip())
            if usage is None:
                continue
            if found is None:
                found = usage
            else:  # OpenAI's usage chunk may follow llama.cpp's timings chunk: take both
                found = Usage(
                    found.prompt_tokens if found.prompt_tokens is not None else usage.prompt_tokens,
                    found.completion_tokens
                    if found.completion_tokens is not None
                    else usage.completion_tokens,
                    found.tokens_per_s if found.tokens_per_s is not None else usage.tokens_per_s,
                )
            if found.tokens_per_s is not None and found.completion_tokens is not None:
                return found
    return found


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds")


class _Minute:
    """Counts for the sample being gathered."""

    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.tokens: dict[str, int] = {}


class _ModelTotals:
    __slots__ = ("day", "load_count", "load_seconds", "loads_today", "speed", "speed_n")

    def __init__(self) -> None:
        self.day = ""
        self.loads_today = 0
        self.load_count = 0
        self.load_seconds = 0.0
        self.speed = 0.0  # the mean tokens/s of the answers that reported it
        self.speed_n = 0


def next_edge(previous: float | None, now: float, interval: float) -> float:
    """When the next sample is due: the next whole multiple of ``interval`` after ``now``, and
    always after ``previous``, the edge just sampled. A timer may fire a millisecond early
    (uvloop's are whole milliseconds); the edge computed anew from the clock would then be the
    same one again, giving a second, empty sample a moment later."""
    edge = (now // interval + 1) * interval
    return edge if previous is None else max(previous + interval, edge)


class Activity:
    """The history of one swapper app."""

    def __init__(
        self, settings: ActivitySettings, coordinator: SwapCoordinator, gpu: GpuMonitor
    ) -> None:
        self.settings = settings
        self._coordinator = coordinator
        self._gpu = gpu
        self.requests: deque[dict[str, Any]] = deque(maxlen=settings.requests)
        self.swaps: deque[dict[str, Any]] = deque(maxlen=settings.events)
        self.loads: deque[dict[str, Any]] = deque(maxlen=settings.events)
        self.errors: deque[dict[str, Any]] = deque(maxlen=settings.events)
        self.samples: deque[dict[str, Any]] = deque(maxlen=settings.samples)
        self._history: deque[Event] = deque(maxlen=settings.events)
        self._minute = _Minute()
        self._models: dict[str, _ModelTotals] = {}
        self._sampler: asyncio.Task[None] | None = None
        coordinator.events.add_listener(self.on_event)

    # -- feeding ---------------------------------------------------------------------------------

    def request(
        self,
        *,
        model: str,
        endpoint: str,
        method: str,
        status: str,
        seconds: float,
        ttfb: float | None,
        request_id: str,
        client: str | None,
        usage: Usage | None,
    ) -> None:
        """Record one answered request (called where its access-log line is written)."""
        if endpoint in _QUIET and not model:
            return
        now = time.time()
        record: dict[str, Any] = {
            "time": now,
            "model": model or None,
            "endpoint": endpoint,
            "method": method,
            "status": status,
            "duration_s": round(seconds, 4),
            "ttfb_s": None if ttfb is None else round(ttfb, 4),
            "request_id": request_id,
            "client": client,
            "prompt_tokens": None,
            "completion_tokens": None,
            "tokens_per_s": None,
        }
        minute = self._minute
        if model:
            minute.requests[model] = minute.requests.get(model, 0) + 1
        if usage is not None:
            record["prompt_tokens"] = usage.prompt_tokens
            record["completion_tokens"] = usage.completion_tokens
            speed = usage.tokens_per_s
            if speed is None and usage.completion_tokens and seconds > 0:
                # No timings from the backend: the tokens over the time after the first byte.
                spent = seconds - (ttfb or 0.0)
                speed = usage.completion_tokens / spent if spent > 0 else None
            record["tokens_per_s"] = None if speed is None else round(speed, 2)
            if model and usage.completion_tokens:
                minute.tokens[model] = minute.tokens.get(model, 0) + usage.completion_tokens
            if model and speed is not None:
                totals = self._totals(model)
                totals.speed_n += 1
                totals.speed += (speed - totals.speed) / totals.speed_n
        self.requests.append(record)
        if status == "stream_error" or (status.isdigit() and int(status) >= 500):
            self.errors.append(
                {
                    "time": now,
                    "kind": "request",
                    "model": model or None,
                    "message": f"{method} {endpoint} answered {status}",
                    "request_id": request_id,
                }
            )

    def _totals(self, model: str) -> _ModelTotals:
        totals = self._models.get(model)
        if totals is None:
            totals = self._models[model] = _ModelTotals()
        return totals

    def on_event(self, event: Event) -> None:
        """Keep swaps, loads, failures and the replayable history (an event-bus listener)."""
        kind, data = event.type, event.data
        if kind not in _HISTORY_TYPES:
            return
        self._history.append(event)
        if kind == "swap":
            self.swaps.append(
                {
                    "time": event.time,
                    "from": data.get("from"),
                    "to": data.get("to"),
                    "reason": data.get("reason"),
                    "seconds": data.get("seconds"),
                }
            )
        elif kind in ("loaded", "unloaded"):
            model, seconds = data.get("model", ""), float(data.get("seconds") or 0.0)
            self.loads.append(
                {"time": event.time, "kind": kind, "model": model, "seconds": seconds}
            )
            if kind == "loaded":
                totals = self._totals(model)
                today = time.strftime("%Y-%m-%d", time.localtime(event.time))
                if totals.day != today:
                    totals.day, totals.loads_today = today, 0
                totals.loads_today += 1
                totals.load_count += 1
                totals.load_seconds += seconds
        elif kind == "status" and data.get("status") == "FAILED":
            self.errors.append(
                {
                    "time": event.time,
                    "kind": "model",
                    "model": data.get("model"),
                    "message": data.get("last_error") or "failed",
                    "request_id": None,
                }
            )

    def history(self) -> list[Event]:
        """The recent status changes, swaps, loads and unloads, oldest first."""
        return list(self._history)

    # -- sampling --------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin taking a sample every ``sample_seconds``."""
        self._sampler = asyncio.create_task(self._sample_forever())

    async def stop(self) -> None:
        """Stop the sampler."""
        task, self._sampler = self._sampler, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample_forever(self) -> None:
        interval = self.settings.sample_seconds
        edge = next_edge(None, time.time(), interval)
        while True:
            await asyncio.sleep(max(0.0, edge - time.time()))  # on the interval's edges
            try:
                await self.sample()
            except Exception:  # one bad reading must not end the history
                logger.exception("activity sample failed")
            edge = next_edge(edge, time.time(), interval)

    async def sample(self) -> dict[str, Any]:
        """Close the period being gathered into a sample: requests and tokens/s by model,
        queue depth, resident models, VRAM per GPU (NVML read in a worker thread)."""
        gpus = await asyncio.to_thread(self._gpu.gpus)
        # From here on no await: the counts and the coordinator's state are read together.
        minute, self._minute = self._minute, _Minute()
        interval = self.settings.sample_seconds
        loads = self._coordinator.loads()
        sample = {
            "time": time.time(),
            "seconds": interval,
            "requests": dict(minute.requests),
            "tokens_per_s": {m: round(n / interval, 3) for m, n in minute.tokens.items()},
            "queue_depth": sum(load.queued for load in loads.values()),
            "resident": list(self._coordinator.resident_models),
            "vram_mb": {str(g.index): round(g.used_mb) for g in gpus},
        }
        self.samples.append(sample)
        return sample

    # -- reading ---------------------------------------------------------------------------------

    def document(self, limit: int | None = None) -> dict[str, Any]:
        """The ``/activity`` JSON: the newest ``limit`` of each list (all by default), latest
        last; times are ISO 8601 UTC with milliseconds, as in ``/status``."""

        def timed(items: deque[dict[str, Any]]) -> list[dict[str, Any]]:
            chosen = list(items)[-limit:] if limit else list(items)
            return [{**item, "time": _iso(item["time"])} for item in chosen]

        return {
            "sizes": {
                "requests": self.settings.requests,
                "events": self.settings.events,
                "samples": self.settings.samples,
                "sample_seconds": self.settings.sample_seconds,
            },
            "models": self._model_summary(),
            "requests": timed(self.requests),
            "swaps": timed(self.swaps),
            "loads": timed(self.loads),
            "errors": timed(self.errors),
            "samples": timed(self.samples),
        }

    def _model_summary(self) -> dict[str, Any]:
        last_request: dict[str, float] = {}
        for record in self.requests:
            if record["model"]:
                last_request[record["model"]] = record["time"]
        today = time.strftime("%Y-%m-%d")
        summary: dict[str, Any] = {}
        for model, totals in self._models.items():
            summary[model] = {
                "loads_today": totals.loads_today if totals.day == today else 0,
                "mean_load_s": round(totals.load_seconds / totals.load_count, 3)
                if totals.load_count
                else None,
                "tokens_per_s": round(totals.speed, 2) if totals.speed_n else None,
                "last_request": _iso(last_request[model]) if model in last_request else None,
            }
        for model, when in last_request.items():
            summary.setdefault(
                model,
                {
                    "loads_today": 0,
                    "mean_load_s": None,
                    "tokens_per_s": None,
                    "last_request": _iso(when),
                },
            )
        return summary
