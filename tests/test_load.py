"""Mixed load with swaps: 200 concurrent clients for 60 s against a real `swapper serve`.

The clients mix streaming and non-streaming chat completions across the three tiny models in
single-active mode, so swapper swaps all the time. Every request must either complete correctly
or be refused with 429/503 and a valid ``Retry-After``: no hung request, no other 5xx, and
swapper's RSS must stay bounded. The figures (outcomes, swaps, RSS, latency) are printed, put
into the assertion messages and, when ``$SWAPPER_LOAD_REPORT`` names a file, written there as
JSON.

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

pytestmark = [pytest.mark.integration, pytest.mark.load]

CLIENTS = 200
DURATION = float(os.environ.get("SWAPPER_LOAD_SECONDS", "60"))
SEED = int(os.environ.get("SWAPPER_LOAD_SEED", "0"))
MODELS = ("tiny-a", "tiny-b", "tiny-c")
MESSAGES = [{"role": "user", "content": "Say something."}]
#: Waiters beyond this get 429 + Retry-After. Far below the 200 clients on purpose, so the queue
#: cap is exercised all the time; it also bounds queueing: a request waits behind at most 64
#: others, which at the ~40 completions/s (a swap every ~0.35 s) measured here is a few seconds.
MAX_QUEUE = 64
#: A request that has not finished after this long counts as hung. About four times the worst
#: latency measured on this machine with this queue cap (~6 s), and short enough that a hung
#: request still lets the whole test end within ~90 s (60 s of load, then at most this).
REQUEST_TIMEOUT = 25.0
#: Clients honour Retry-After, but never sleep longer than this: the run is only a minute long.
RETRY_AFTER_CAP = 1.0
#: Bounds for swapper's own RSS (not its backends'). Measured here: ~54 MB idle, ~59 MB after
#: warm-up and flat from then on through ~9000 requests and ~170 swaps. The peak bound leaves
#: more than 3x headroom for other Python builds; the growth bound catches a leak of anything
#: kept per request or per swap (at ~10 kB per request it would already trip).
RSS_PEAK_LIMIT_KB = 200 * 1024
RSS_GROWTH_FACTOR = 1.5


@dataclass
class Tally:
    """What happened to every request, by outcome and by model."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_by_model: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_latencies: list[float] = field(default_factory=list)
    retry_after: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The first few bad requests, described, for the assertion messages.
    problems: list[str] = field(default_factory=list)

    def bad(self, outcome: str, detail: str) -> None:
        self.outcomes[outcome] += 1
        if len(self.problems) < 20:
            self.problems.append(f"{outcome}: {detail}")


@dataclass
class Samples:
    """Once a second during the run: swapper's RSS, its backends and its /status."""

    rss_kb: list[tuple[float, int]] = field(default_factory=list)
    loaded_pids: dict[int, str] = field(default_factory=dict)
    max_backends: int = 0
    max_queued: int = 0
    status_failures: int = 0


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
    events = [event.strip() for event in text.split("\n\n")
              if event.strip() and not event.startswith(":")]
    if not events or events[-1] != "data: [DONE]":
        return f"does not end with data: [DONE]: {text[-300:]!r}"
    finished = False
    for event in events[:-1]:
        if not event.startswith("data: "):
            return f"not a data event: {event[:200]!r}"
        try:
            chunk = json.loads(event[len("data: "):])
        except ValueError:
            return f"data is not JSON: {event[:200]!r}"
        if "error" in chunk:  # swapper's mid-stream failure event
            return f"error event: {event[:300]!r}"
        if chunk.get("object") != "chat.completion.chunk":
            return f"not a chunk: {event[:200]!r}"
        finished |= any(c.get("finish_reason") for c in chunk.get("choices", []))
    return None if finished else "no chunk has a finish_reason"


async def one_request(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> float:
    """Send one random request and record its outcome; return how long to back off."""
    model = rng.choice(MODELS)
    stream = rng.random() < 0.5
    body = {"model": model, "messages": MESSAGES, "max_tokens": rng.randint(4, 16),
            "stream": stream}
    started = time.monotonic()
    try:
        # httpx's timeouts are per read; the whole exchange needs one bound for "hung".
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                raw = await response.aread()
    except (TimeoutError, httpx.TimeoutException):
        tally.bad("hung", f"{model} stream={stream} unfinished after {REQUEST_TIMEOUT:g}s")
        return 0.0
    except httpx.HTTPError as exc:
        tally.bad("transport_error", f"{model} stream={stream}: {exc!r}")
        return 0.1  # swapper may be gone; do not spin
    elapsed = time.monotonic() - started
    status = response.status_code
    if status == 200:
        problem = check_stream(raw) if stream else check_completion(raw)
        if problem is None and stream and not response.headers.get(
                "content-type", "").startswith("text/event-stream"):
            problem = f"content-type {response.headers.get('content-type')!r}"
        if problem is not None:
            tally.bad("invalid_200", f"{model} stream={stream}: {problem}")
            return 0.0
        tally.outcomes["ok"] += 1
        tally.ok_by_model[model] += 1
        tally.ok_by_kind["stream" if stream else "non_stream"] += 1
        tally.ok_latencies.append(elapsed)
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


async def client(index: int, http: httpx.AsyncClient, deadline: float, tally: Tally,
                 swapper: SwapperProcess) -> None:
    """One client: requests back to back until the deadline (bounded by it and by timeouts)."""
    # One generator per client: the mix each client sends does not depend on the interleaving.
    rng = random.Random(f"{SEED}-{index}")
    while time.monotonic() < deadline and swapper.proc.poll() is None:
        backoff = await one_request(http, rng, tally)
        if backoff:
            # Client behaviour, not waiting for a state: honour Retry-After (capped).
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))


async def sample(swapper: SwapperProcess, samples: Samples, started: float,
                 stop: asyncio.Event) -> None:
    """Every second: RSS, live backends (never more than one) and /status (pids, queue)."""
    # Its own connection, so a saturated client pool cannot delay the sampling.
    async with httpx.AsyncClient(base_url=swapper.url, timeout=5) as http:
        while not stop.is_set():
            rss = rss_kb(swapper.proc.pid)
            if rss is None:
                return  # swapper is gone; the test says so, with its output
            samples.rss_kb.append((time.monotonic() - started, rss))
            backends = await asyncio.to_thread(swapper.backends)
            samples.max_backends = max(samples.max_backends, len(backends))
            try:
                response = await http.get("/status")
                response.raise_for_status()
                status = response.json()
            except (httpx.HTTPError, ValueError):
                samples.status_failures += 1
            else:
                queued = 0
                for model_id, model in status["models"].items():
                    queued += model["queued"]
                    if model["status"] == "LOADED" and model["pid"]:
                        samples.loaded_pids[model["pid"]] = model_id
                samples.max_queued = max(samples.max_queued, queued)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def run_load(swapper: SwapperProcess, tally: Tally, samples: Samples) -> float:
    """200 clients until the deadline, with the sampler alongside; returns the run's seconds."""
    limits = httpx.Limits(max_connections=CLIENTS + 20, max_keepalive_connections=CLIENTS + 20)
    # httpx's own timeout only backs up the per-request bound in one_request.
    timeout = httpx.Timeout(REQUEST_TIMEOUT + 5)
    started = time.monotonic()
    deadline = started + DURATION
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=swapper.url, limits=limits, timeout=timeout) as http:
        sampler = asyncio.create_task(sample(swapper, samples, started, stop))
        clients = [asyncio.create_task(client(i, http, deadline, tally, swapper))
                   for i in range(CLIENTS)]
        # Each client ends at most one request timeout (plus a capped back-off) after the
        # deadline; the outer bound only guards the test against a bug in the test itself.
        done, pending = await asyncio.wait(clients, timeout=DURATION + REQUEST_TIMEOUT + 10)
        for task in pending:
            task.cancel()
        stop.set()
        await sampler
        for task in done:
            task.result()  # a bug in the client code must fail the test, not vanish
        assert not pending, f"{len(pending)} clients did not end"
    return time.monotonic() - started


def warning_lines(output: str, limit: int = 40) -> str:
    """swapper's own warnings and errors (not the backends' chatter), for failure messages."""
    lines = [line for line in output.splitlines()
             if re.search(r" (WARNING|ERROR|CRITICAL) +swapper|Traceback|illegal transition", line)]
    return "\n".join(lines[-limit:]) or "(none)"


def test_mixed_load_with_swaps(swapper_factory: Any) -> None:
    test_started = time.monotonic()
    swapper: SwapperProcess = swapper_factory(swapper={"max_queue": MAX_QUEUE, "max_overtake": 8})
    rss_idle = rss_kb(swapper.proc.pid)
    assert rss_idle is not None
    tally, samples = Tally(), Samples()

    elapsed = asyncio.run(run_load(swapper, tally, samples))

    assert swapper.proc.poll() is None, f"swapper exited:\n{swapper.output()[-5000:]}"

    def settled() -> dict[str, Any] | None:
        status = swapper.status()
        models = status["models"].values()
        return status if all(m["in_flight"] == 0 and m["queued"] == 0
                             and m["status"] not in ("LOADING", "UNLOADING")
                             for m in models) else None

    # A stream's lease is released just after its last bytes went out, and a swap begun for a
    # request that then timed out may still be stopping a backend: allow a moment for both.
    status = wait_until(settled, 10, "in_flight and queued to be 0 and no swap under way")
    loaded = [(mid, m["pid"]) for mid, m in status["models"].items() if m["status"] == "LOADED"]
    rss_end = rss_kb(swapper.proc.pid)
    assert rss_end is not None
    warmup_at = DURATION / 6  # 10 s of a 60 s run: every model loaded, pools and caches warm
    rss_warm = next((kb for t, kb in samples.rss_kb if t >= warmup_at), rss_idle)
    rss_peak = max([rss_idle, rss_end, *(kb for _, kb in samples.rss_kb)])
    output = swapper.output()
    loads = re.findall(r"swapper\.coordinator: (\S+) loaded in ([\d.]+)s \(pid (\d+)\)", output)
    swaps = max(0, len(loads) - 1)  # the first load is not a swap
    latencies = sorted(tally.ok_latencies)
    report = {
        "clients": CLIENTS, "duration_s": DURATION, "seed": SEED, "max_queue": MAX_QUEUE,
        "run_s": round(elapsed, 1), "outcomes": dict(tally.outcomes),
        "requests": sum(tally.outcomes.values()),
        "ok_by_model": dict(tally.ok_by_model), "ok_by_kind": dict(tally.ok_by_kind),
        "retry_after": dict(tally.retry_after),
        "ok_latency_s": {
            "p50": round(statistics.median(latencies), 3) if latencies else None,
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
            "max": round(latencies[-1], 3) if latencies else None,
            "over_5s": sum(1 for t in latencies if t > 5)},
        "swaps": swaps, "loads_by_model": dict(collections.Counter(m for m, _, _ in loads)),
        "load_time_max_s": max((float(s) for _, s, _ in loads), default=None),
        "distinct_backend_pids_seen": len(samples.loaded_pids),
        "max_backends_seen": samples.max_backends, "max_queued_seen": samples.max_queued,
        "status_sample_failures": samples.status_failures,
        "rss_mb": {"idle": round(rss_idle / 1024, 1), "after_warmup": round(rss_warm / 1024, 1),
                   "peak": round(rss_peak / 1024, 1), "end": round(rss_end / 1024, 1)},
        "rss_mb_per_second": [round(kb / 1024, 1) for _, kb in samples.rss_kb],
        "problems": tally.problems,
        "test_s": round(time.monotonic() - test_started, 1),
    }
    print("\nload report:", json.dumps({k: v for k, v in report.items()
                                         if k != "rss_mb_per_second"}, indent=1))
    if path := os.environ.get("SWAPPER_LOAD_REPORT"):
        Path(path).write_text(json.dumps(report, indent=1))
    summary = (f"report: {json.dumps({k: v for k, v in report.items() if k != 'rss_mb_per_second'})}"
               f"\nswapper warnings and errors:\n{warning_lines(output)}")

    # Every request completed correctly or was refused with 429/503 + Retry-After.
    bad = {k: v for k, v in tally.outcomes.items() if not (k == "ok" or k.startswith("refused_"))}
    assert not bad, f"bad outcomes {bad}\n{summary}"
    # Real work for every model, not a run of refusals: at 60 s this asks for 100 completions
    # per model, where a healthy run here completes ~800.
    min_ok = max(20, int(100 * DURATION / 60))
    for model in MODELS:
        assert tally.ok_by_model[model] >= min_ok, f"{model}: too few completions\n{summary}"
    assert tally.ok_by_kind["stream"] and tally.ok_by_kind["non_stream"], summary
    # Swaps really happened, each with a fresh backend process.
    min_swaps = max(3, int(10 * DURATION / 60))
    assert swaps >= min_swaps, f"only {swaps} swaps\n{summary}"
    assert len({pid for _, _, pid in loads}) == len(loads), f"a load reused a process\n{summary}"
    assert len(samples.loaded_pids) >= 2, f"/status never showed another pid\n{summary}"
    # Single-active held throughout and after: never two backends, at most one resident now.
    assert samples.max_backends <= 1, summary
    assert len(loaded) <= 1, f"{loaded}\n{summary}"
    assert sorted(swapper.backends()) == sorted(pid for _, pid in loaded), summary
    # Nothing went wrong inside swapper, even where the client could not see it.
    for marker in ("Traceback", "unhandled error", "illegal transition", "died unexpectedly"):
        assert marker not in output, f"{marker!r} in swapper's output\n{summary}"
    # RSS stays bounded: no per-request or per-swap leak.
    assert rss_peak < RSS_PEAK_LIMIT_KB, f"RSS peak {rss_peak} kB\n{summary}"
    assert rss_end <= RSS_GROWTH_FACTOR * rss_warm, f"RSS grew {rss_warm} -> {rss_end} kB\n{summary}"
