"""Mixed load with swaps: 200 concurrent clients for 60 s against a real `swapper serve`.

The clients mix streaming and non-streaming chat completions across the three tiny models in
single-active mode, so swapper swaps all the time. Every request must either complete correctly
or be refused with 429/503 and a valid ``Retry-After``: no hung request, no other 5xx, and
swapper's RSS must stay bounded.

Nothing here is a wall-clock figure of one machine. Waiting is measured in swaps, as the
scheduler bounds it: swapper's own ``/events`` stream (read on its own thread) gives every
status change, swap and queue change in order, so the swaps each queued request waited are
counted exactly, and single-active is checked on the full event sequence rather than on
samples. A hang is no progress (no completion, no swap) for ``HANG_FACTOR`` median swap
periods of the same run, or no completion for twice that (a livelock); after the deadline no request is started and the test waits for the
outstanding ones by the same rule, not by a fixed timeout.

The figures (outcomes, swaps, swaps waited, median swap time, RSS) are printed, put into the
assertion messages and, when ``$SWAPPER_LOAD_REPORT`` names a file, written there as JSON.
``SWAPPER_LOAD_SECONDS`` shortens the run for local iterations (default 60); ``SWAPPER_LOAD_SEED``
changes the request mix (default 0). Everything stays on loopback.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import os
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SwapperProcess, wait_until
from tests.load_events import EventLog

pytestmark = [pytest.mark.integration, pytest.mark.load]

CLIENTS = 200
DURATION = float(os.environ.get("SWAPPER_LOAD_SECONDS", "60"))
SEED = int(os.environ.get("SWAPPER_LOAD_SEED", "0"))
MODELS = ("tiny-a", "tiny-b", "tiny-c")
#: A prompt that makes the tiny models talk a little (the shared "hi" often ends at once).
MESSAGES = [{"role": "user", "content": "Say something."}]
#: Waiters beyond this get 429 + Retry-After: far below the 200 clients, so the cap is hit all
#: the time.
MAX_QUEUE = 64
MAX_OVERTAKE = 8
#: The most swaps a queued request can wait, from joining the queue to its admission, derived
#: from Admission._place and _admit_queued (one slot, 3 models, no request gives up, no
#: ttl or manual unload). A request W joins behind at most MAX_QUEUE - 1 waiters, and later
#: arrivals never get ahead of it (arrival order). Each swap loads the model m of the oldest
#: waiter whose model is not resident, so that waiter is W or ahead of W. On LOADED, m admits
#: every m-waiter ahead of the next blocked waiter (at least that oldest one), then up to
#: k = MAX_OVERTAKE later m-waiters in arrival order, with an overtake budget that was reset
#: when the blocked waiter changed (no m-request is admitted while m loads, so it is whole).
#: So a swap to m takes min(c, k + 1) or more of the c m-waiters still ahead of W, and once
#: none is left, m is not loaded again before W. With c_m waiters per model ahead of W (W
#: counted with its own model), sum(c_m) <= MAX_QUEUE and the swaps are at most
#: sum(ceil(c_m / (k + 1))) <= (MAX_QUEUE + 3k) // (k + 1): 9 here, reached by 28, 28 and 8.
#: (MAX_QUEUE + 2 holds as well but is loose: only without overtaking, k = 0, does this bound
#: reach MAX_QUEUE.) Counted on swapper's own event sequence, so client or HTTP lag (seconds of it
#: on a busy machine, before swapper even reads a request) is not charged to the scheduler.
SWAP_BOUND = (MAX_QUEUE + len(MODELS) * MAX_OVERTAKE) // (MAX_OVERTAKE + 1)
#: No completion and no swap for this many median swap periods (swap to swap, measured in this
#: run) is a hang. While work is outstanding, every period ends with a swap and holds the
#: completions of its residency, so a healthy gap is at most one period; ten of them leaves
#: room for a slow one on a busy machine. (The swap alone, unload to ready, is too short a unit:
#: it leaves out the drain and the generation of the batch that follows it.)
HANG_FACTOR = 10
#: Until the run has measured a few periods, the limit is twice the config's
#: model_swap_timeout (30 s, set by swapper_factory): a load that takes longer has failed.
FIRST_SWAP_LIMIT = 60.0
#: Clients honour Retry-After, but never sleep longer than this: the run is only a minute long.
RETRY_AFTER_CAP = 1.0
#: Bounds for swapper's own RSS (not its backends'). Measured: ~54 MB idle, ~59 MB after
#: warm-up and flat from then on through ~9000 requests and ~170 swaps. The peak bound leaves
#: more than 3x headroom for other Python builds; the growth bound catches a leak of anything
#: kept per request or per swap (at ~10 kB per request it would already trip).
RSS_PEAK_LIMIT_KB = 200 * 1024
RSS_GROWTH_FACTOR = 1.5


@dataclass
class Tally:
    """What happened to every request, by outcome and by model; swapper's RSS over the run."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_by_model: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_latencies: list[float] = field(default_factory=list)
    retry_after: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The first few bad requests, described, for the assertion messages.
    problems: list[str] = field(default_factory=list)
    outstanding: int = 0
    rss_kb: list[tuple[float, int]] = field(default_factory=list)

    def bad(self, outcome: str, detail: str) -> None:
        self.outcomes[outcome] += 1
        if len(self.problems) < 20:
            self.problems.append(f"{outcome}: {detail}")


def hang_limit(events: EventLog) -> float:
    """No progress for this long is a hang (see HANG_FACTOR)."""
    period = events.median_period_s()
    return FIRST_SWAP_LIMIT if period is None else HANG_FACTOR * period


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in kB; None once it is gone (a zombie has no VmRSS either)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def valid_retry_after(value: str | None) -> bool:
    """Retry-After is delay-seconds (a non-negative integer) or an HTTP-date (RFC 9110)."""
    if value is None:
        return False
    if value.strip().isdigit():
        return True
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError):
        return False


def check_completion(body: bytes) -> str | None:
    """None when a non-stream answer is a valid chat completion, else what is wrong."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        if data.get("object") != "chat.completion":
            return f"object is {data.get('object')!r}"
        if not isinstance(choice["message"]["content"], str):
            return "no message content"
        if choice.get("finish_reason") not in ("stop", "length"):
            return f"finish_reason {choice.get('finish_reason')!r}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"not a chat completion ({exc!r}): {body[:200]!r}"
    return None


def check_stream(body: bytes) -> str | None:
    """None when an SSE answer is chunks of valid JSON ending with ``data: [DONE]``."""
    text = body.decode(errors="replace")
    # Comment events (": loading tiny-a 3.0s" while a model loads) are ignored, as clients do.
    events = [
        event.strip() for event in text.split("\n\n") if event.strip() and not event.startswith(":")
    ]
    if not events or events[-1] != "data: [DONE]":
        return f"does not end with data: [DONE]: {text[-300:]!r}"
    finished = False
    for event in events[:-1]:
        if not event.startswith("data: "):
            return f"not a data event: {event[:200]!r}"
        try:
            chunk = json.loads(event[len("data: ") :])
        except ValueError:
            return f"data is not JSON: {event[:200]!r}"
        if "error" in chunk:  # swapper's mid-stream failure event
            return f"error event: {event[:300]!r}"
        if chunk.get("object") != "chat.completion.chunk":
            return f"not a chunk: {event[:200]!r}"
        finished |= any(c.get("finish_reason") for c in chunk.get("choices", []))
    return None if finished else "no chunk has a finish_reason"


@dataclass
class Run:
    """What the clients and the watchdog share: when things last moved, and the hang if any."""

    last_completion: float = field(default_factory=time.monotonic)
    last_swap: float = field(default_factory=time.monotonic)
    hang: str | None = None

    def swapped(self) -> None:
        """A swap was seen (called on the loop, from the events thread)."""
        self.last_swap = time.monotonic()


async def one_request(http: httpx.AsyncClient, rng: random.Random, tally: Tally, run: Run) -> float:
    """Send one random request and record its outcome; return how long to back off."""
    model = rng.choice(MODELS)
    stream = rng.random() < 0.5
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": rng.randint(4, 16),
        "stream": stream,
    }
    sent = time.monotonic()
    tally.outstanding += 1
    try:
        # No timeout of its own: the watchdog decides what is a hang, in swap times.
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            raw = await response.aread()
    except httpx.HTTPError as exc:
        tally.bad("transport_error", f"{model} stream={stream}: {exc!r}")
        return 0.1  # swapper may be gone; do not spin
    finally:
        tally.outstanding -= 1
    ended = time.monotonic()
    status = response.status_code
    if status == 200:
        problem = check_stream(raw) if stream else check_completion(raw)
        if (
            problem is None
            and stream
            and not response.headers.get("content-type", "").startswith("text/event-stream")
        ):
            problem = f"content-type {response.headers.get('content-type')!r}"
        if problem is not None:
            tally.bad("invalid_200", f"{model} stream={stream}: {problem}")
            return 0.0
        tally.outcomes["ok"] += 1
        tally.ok_by_model[model] += 1
        tally.ok_by_kind["stream" if stream else "non_stream"] += 1
        tally.ok_latencies.append(ended - sent)
        run.last_completion = ended
        return 0.0
    if status in (429, 503):
        retry_after = response.headers.get("retry-after")
        try:
            error = json.loads(raw)["error"]
            assert {"message", "type", "param", "code"} <= set(error)
        except (ValueError, KeyError, TypeError, AssertionError):
            tally.bad(f"invalid_{status}", f"{model}: not OpenAI error JSON: {raw[:200]!r}")
            return RETRY_AFTER_CAP
        if not valid_retry_after(retry_after):
            tally.bad(f"invalid_{status}", f"{model}: Retry-After {retry_after!r}: {raw[:200]!r}")
            return RETRY_AFTER_CAP
        tally.outcomes[f"refused_{status}"] += 1
        tally.retry_after[f"{status}:{retry_after}"] += 1
        assert retry_after is not None
        seconds = float(retry_after) if retry_after.strip().isdigit() else RETRY_AFTER_CAP
        return min(seconds, RETRY_AFTER_CAP)
    kind = "other_5xx" if status >= 500 else "other_status"
    tally.bad(kind, f"{model} stream={stream}: HTTP {status}: {raw[:300]!r}")
    return 0.0


async def client(
    index: int,
    http: httpx.AsyncClient,
    deadline: float,
    tally: Tally,
    run: Run,
    swapper: SwapperProcess,
) -> None:
    """One client: requests back to back until the deadline; none is started after it."""
    # One generator per client: the mix each client sends does not depend on the interleaving.
    rng = random.Random(f"{SEED}-{index}")
    while time.monotonic() < deadline and swapper.proc.poll() is None:
        backoff = await one_request(http, rng, tally, run)
        if backoff:
            # Client behaviour, not waiting for a state: honour Retry-After (capped).
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))


async def watchdog(tally: Tally, run: Run, events: EventLog) -> None:
    """Return once requests are outstanding and stalled: no completion and no swap for the hang
    limit, or no completion for twice that (swapping without serving: a livelock)."""
    while True:
        limit = hang_limit(events)
        await asyncio.sleep(limit / 4)  # a check of the clocks below, not a wait for a state
        now = time.monotonic()
        if not tally.outstanding:  # every client backing off: nothing to wait for
            run.last_completion = run.last_swap = now
            continue
        served, swapped = now - run.last_completion, now - run.last_swap
        if (served > limit and swapped > limit) or served > 2 * limit:
            run.hang = (
                f"{tally.outstanding} requests outstanding; last completion {served:.1f}s "
                f"ago, last swap {swapped:.1f}s ago; limit {limit:.1f}s (median swap "
                f"period {events.median_period_s()}s)"
            )
            return


async def sample_rss(swapper: SwapperProcess, tally: Tally, started: float) -> None:
    """swapper's RSS once a second (a leak grows steadily; sampling cannot miss it)."""
    while (rss := rss_kb(swapper.proc.pid)) is not None:
        tally.rss_kb.append((time.monotonic() - started, rss))
        await asyncio.sleep(1.0)


async def run_load(swapper: SwapperProcess, tally: Tally) -> tuple[float, EventLog, Run]:
    """200 clients until the deadline, then every outstanding request to its end (or a hang)."""
    run = Run()
    loop = asyncio.get_running_loop()
    events = EventLog(swapper.url, lambda: loop.call_soon_threadsafe(run.swapped))
    await asyncio.to_thread(events.subscribed.wait)  # the snapshot came: no event is missed
    assert events.error is None, f"/events failed: {events.error!r}"
    limits = httpx.Limits(max_connections=CLIENTS + 20, max_keepalive_connections=CLIENTS + 20)
    started = time.monotonic()
    deadline = started + DURATION
    async with httpx.AsyncClient(base_url=swapper.url, limits=limits, timeout=None) as http:
        sampler = asyncio.create_task(sample_rss(swapper, tally, started))
        guard = asyncio.create_task(watchdog(tally, run, events))
        clients = [
            asyncio.create_task(client(i, http, deadline, tally, run, swapper))
            for i in range(CLIENTS)
        ]
        # Ends when every client has ended (its last request answered) or the watchdog saw a
        # hang: both are events, no fixed timeout.
        everyone = asyncio.ensure_future(asyncio.wait(clients))
        await asyncio.wait([everyone, guard], return_when=asyncio.FIRST_COMPLETED)
        for task in [everyone, *clients, guard, sampler]:
            task.cancel()
        results = await asyncio.gather(*clients, guard, sampler, return_exceptions=True)
        for result in results[:CLIENTS]:
            if isinstance(result, Exception):  # a bug in the client code must fail the test
                raise result
    return time.monotonic() - started, events, run


def warning_lines(output: str, limit: int = 40) -> str:
    """swapper's own warnings and errors (not the backends' chatter), for failure messages."""
    lines = [
        line
        for line in output.splitlines()
        if re.search(r" (WARNING|ERROR|CRITICAL) +swapper|Traceback|illegal transition", line)
    ]
    return "\n".join(lines[-limit:]) or "(none)"


def test_mixed_load_with_swaps(swapper_factory: Any) -> None:
    test_started = time.monotonic()
    swapper: SwapperProcess = swapper_factory(
        swapper={"max_queue": MAX_QUEUE, "max_overtake": MAX_OVERTAKE}
    )
    rss_idle = rss_kb(swapper.proc.pid)
    assert rss_idle is not None
    tally = Tally()

    elapsed, events, run = asyncio.run(run_load(swapper, tally))

    assert swapper.proc.poll() is None, f"swapper exited:\n{swapper.output()[-5000:]}"
    median_swap = events.median_swap_s() or 0.0
    median_period = events.median_period_s() or 0.0

    def settled() -> dict[str, Any] | None:
        status = swapper.status()
        models = status["models"].values()
        return (
            status
            if all(
                m["in_flight"] == 0
                and m["queued"] == 0
                and m["status"] not in ("LOADING", "UNLOADING")
                for m in models
            )
            else None
        )

    # A stream's lease is released just after its last bytes went out, and an unload may still
    # be under way: both end within a swap period, given the same slack as a hang.
    status = (
        None
        if run.hang
        else wait_until(
            settled, hang_limit(events), "nothing in flight or queued, no swap under way"
        )
    )
    if status is not None:  # the reader has caught up with that state: no event is left out
        wait_until(lambda: events.caught_up(status), hang_limit(events), "/events to catch up")
    events.stop()
    loaded = (
        []
        if status is None
        else [(mid, m["pid"]) for mid, m in status["models"].items() if m["status"] == "LOADED"]
    )
    rss_end = rss_kb(swapper.proc.pid)
    assert rss_end is not None
    warmup_at = DURATION / 6  # 10 s of a 60 s run: every model loaded, pools and caches warm
    rss_warm = next((kb for t, kb in tally.rss_kb if t >= warmup_at), rss_idle)
    rss_peak = max([rss_idle, rss_end, *(kb for _, kb in tally.rss_kb)])
    output = swapper.output()
    log_loads = re.findall(r"swapper\.coordinator: (\S+) loaded in [\d.]+s \(pid (\d+)\)", output)
    waited = events.waited
    latencies = sorted(tally.ok_latencies)
    report = {
        "clients": CLIENTS,
        "duration_s": DURATION,
        "seed": SEED,
        "max_queue": MAX_QUEUE,
        "max_overtake": MAX_OVERTAKE,
        "run_s": round(elapsed, 1),
        "hang": run.hang,
        "outcomes": dict(tally.outcomes),
        "requests": sum(tally.outcomes.values()),
        "ok_by_model": dict(tally.ok_by_model),
        "ok_by_kind": dict(tally.ok_by_kind),
        "retry_after": dict(tally.retry_after),
        "swaps": len(events.swaps),
        "swaps_by_model": dict(collections.Counter(to for _, _, to, _ in events.swaps)),
        "median_swap_s": round(median_swap, 3),
        "median_swap_period_s": round(median_period, 3),
        "max_swap_s": round(max((s for *_, s in events.swaps), default=0.0), 3),
        "swaps_waited": {
            "bound": SWAP_BOUND,
            "max": max(waited, default=None),
            "queued_requests": len(waited),
            "left_queue": events.drops,
            "overtakes_max": max(events.overtakes.values(), default=0),
            "histogram": dict(sorted(collections.Counter(waited).items())),
        },
        # Client-side seconds: informative only, the test asserts nothing on them.
        "ok_latency_s": {
            "p50": round(statistics.median(latencies), 2) if latencies else None,
            "max": round(latencies[-1], 2) if latencies else None,
        },
        "overlaps": events.overlaps[:5],
        "lost_events": events.lost[:5],
        "rss_mb": {
            "idle": round(rss_idle / 1024, 1),
            "after_warmup": round(rss_warm / 1024, 1),
            "peak": round(rss_peak / 1024, 1),
            "end": round(rss_end / 1024, 1),
        },
        "problems": tally.problems,
        "test_s": round(time.monotonic() - test_started, 1),
    }
    print("\nload report:", json.dumps(report, indent=1))
    if path := os.environ.get("SWAPPER_LOAD_REPORT"):
        Path(path).write_text(json.dumps(report, indent=1))
    summary = f"report: {json.dumps(report)}\nswapper warnings and errors:\n{warning_lines(output)}"

    # None hangs: the watchdog never saw outstanding requests stall (see watchdog).
    assert run.hang is None, f"hang: {run.hang}\n{summary}"
    # The event record is whole, or nothing below could be trusted.
    assert events.error is None, f"/events failed: {events.error!r}\n{summary}"
    assert not events.lost, f"events were lost: {events.lost[:5]}\n{summary}"
    assert len(events.swaps) == len(events.loaded_pids) == len(log_loads), summary
    # Every request completed correctly or was refused with 429/503 + Retry-After.
    bad = {k: v for k, v in tally.outcomes.items() if not (k == "ok" or k.startswith("refused_"))}
    assert not bad, f"bad outcomes {bad}\n{summary}"
    # Single-active held at every event (the bounds below assume one slot).
    assert not events.overlaps, f"two models held a backend at once\n{summary}"
    # No queued request waited more swaps than the scheduler promises (see SWAP_BOUND); every
    # one was admitted (nobody gives up here), and some did queue, or the bound tested nothing.
    assert waited and max(waited) <= SWAP_BOUND, f"a request waited too many swaps\n{summary}"
    assert events.drops == 0, f"{events.drops} requests left the queue unserved\n{summary}"
    # Later arrivals overtook a waiting request at most max_overtake times (swapper also counts
    # its fast-path admissions, which /events does not show: this is a lower count, so sound).
    assert max(events.overtakes.values(), default=0) <= MAX_OVERTAKE, summary
    # Real work for every model and both kinds; swaps happened (each model had to be loaded).
    for model in MODELS:
        assert tally.ok_by_model[model] >= 1, f"{model} never served\n{summary}"
        assert report["swaps_by_model"].get(model), f"{model} never loaded\n{summary}"
    assert tally.ok_by_kind["stream"] and tally.ok_by_kind["non_stream"], summary
    assert len(events.swaps) > len(MODELS), f"only {len(events.swaps)} swaps\n{summary}"
    # Every load started a fresh process.
    pids = [pid for _, pid in events.loaded_pids]
    assert None not in pids and len(set(pids)) == len(pids), f"a load reused a pid\n{summary}"
    # Single-active holds now too: at most one backend, the resident one.
    assert len(loaded) <= 1, f"{loaded}\n{summary}"
    assert sorted(swapper.backends()) == sorted(pid for _, pid in loaded), summary
    # Nothing went wrong inside swapper, even where the client could not see it.
    for marker in ("Traceback", "unhandled error", "illegal transition", "died unexpectedly"):
        assert marker not in output, f"{marker!r} in swapper's output\n{summary}"
    # RSS stays bounded: no per-request or per-swap leak.
    assert rss_peak < RSS_PEAK_LIMIT_KB, f"RSS peak {rss_peak} kB\n{summary}"
    assert rss_end <= RSS_GROWTH_FACTOR * rss_warm, (
        f"RSS grew {rss_warm} -> {rss_end} kB\n{summary}"
    )
