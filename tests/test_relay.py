"""The HTTP relay against real backend subprocesses: what respx, below the pool, cannot see.

swapper runs as a subprocess in front of the fake ``vllm serve`` (tests/fake_servers/vllm), which
counts the connections and requests swapper's pool sends it (``FAKE_VLLM_STATS=1``), delivers
tokens one by one (``FAKE_VLLM_TOKEN_DELAY``) and can drop a kept-alive connection as a request
crosses it (``FAKE_VLLM_DROP_IDLE``). Bounds on time are taken from the delays and timeouts set
here, or measured in the same run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAKES, SwapperProcess, chat, process_state, tiny_model, wait_until
from tests.test_vllm import gpu_env, vllm

pytestmark = pytest.mark.integration

#: Extra seconds any bound allows for a machine whose cores are all busy.
SLACK = 5.0


def stats(swapper: SwapperProcess, model: str) -> dict[str, int]:
    """The fake vLLM's own counts of what reached it (``FAKE_VLLM_STATS=1``)."""
    port = swapper.model(model)["port"]
    return httpx.get(f"http://127.0.0.1:{port}/fake/stats").json()  # type: ignore[no-any-return]


def words(count: int) -> str:
    """A prompt the fake echoes back token by token, one token delay each."""
    return " ".join(f"w{i}" for i in range(count))


def stream_events(
    swapper: SwapperProcess, model: str, text: str, on_first: Callable[[], None] | None = None
) -> list[tuple[float, dict[str, Any]]]:
    """A streamed chat's ``data:`` events, each with its arrival time (s) since the request."""
    events: list[tuple[float, dict[str, Any]]] = []
    started = time.monotonic()
    with swapper.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": model, "stream": True, "messages": [{"role": "user", "content": text}]},
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            events.append((time.monotonic() - started, json.loads(line[5:])))
            if on_first is not None and len(events) == 1:
                on_first()
    return events


def content_times(events: list[tuple[float, dict[str, Any]]]) -> list[float]:
    """Arrival times of the events that carry generated text."""
    return [
        at
        for at, event in events
        if event.get("choices") and event["choices"][0]["delta"].get("content")
    ]


def test_a_stream_reaches_the_client_token_by_token(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    delay = 0.1
    swapper = swapper_factory(
        models={"a": vllm("org/a")},
        env={"FAKE_VLLM_TOKEN_DELAY": str(delay), "FAKE_VLLM_LOAD_SECONDS": "0.1"},
    )
    assert chat(swapper, "a").status_code == 200  # loaded: the load is not in the timing
    events = stream_events(swapper, "a", words(30))
    arrivals = content_times(events)
    pieces = len(["vllm", "a", "says:"]) + 30
    assert len(arrivals) == pieces
    first, last = arrivals[0], arrivals[-1]
    assert last >= pieces * delay * 0.9, "the backend took its token delays"
    # A relay that buffered the body would deliver every chunk together, at the end.
    assert first < last / 2, f"first token at {first:.2f}s, last at {last:.2f}s: buffered"


def test_streams_and_plain_answers_keep_their_connection(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    # Kept alive after a stream too: a new connection per stream would cost a backend's
    # thread start each time. A backend that drops one as it is reused is sent the request
    # again (test_a_request_on_a_connection_the_backend_dropped_is_sent_again).
    swapper = swapper_factory(
        models={"a": vllm("org/a")}, env={"FAKE_VLLM_STATS": "1", "FAKE_VLLM_LOAD_SECONDS": "0.1"}
    )
    assert chat(swapper, "a").status_code == 200
    assert stats(swapper, "a")["connections"] == 1  # kept alive for the next request
    chat(swapper, "a")
    assert stats(swapper, "a")["max_connections"] == 1  # ... and reused by it
    assert content_times(stream_events(swapper, "a", "hi"))  # sent on that same connection
    assert content_times(stream_events(swapper, "a", "hi again"))  # and the next stream too
    assert chat(swapper, "a").status_code == 200
    seen = stats(swapper, "a")
    assert (seen["connections"], seen["max_connections"]) == (1, 1), seen


def llama_shim(folder: Path) -> str:
    """A ``llama-server`` stand-in that runs the fake vLLM under the model's ``--alias``.

    A llamacpp entry states a connection limit (``--threads-http`` less one); the fake behind
    it counts the connections it is actually sent.
    """
    script = folder / "llama-server-shim"
    script.write_text(
        "#!/bin/sh\n"
        "while [ $# -gt 0 ]; do\n"
        '  case "$1" in --host) host=$2; shift;; --port) port=$2; shift;; '
        "--alias) alias=$2; shift;; esac\n"
        "  shift\n"
        "done\n"
        f'exec "{sys.executable}" "{FAKES / "vllm"}" serve "$alias" '
        '--host "$host" --port "$port"\n'
    )
    script.chmod(0o755)
    return str(script)


def test_a_backend_never_gets_more_connections_than_its_limit(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    limit = 2  # --threads-http 3, less one kept free for health probes
    workdir = swapper_factory.workdir  # type: ignore[attr-defined]
    swapper = swapper_factory(
        models={
            "a": tiny_model(workdir, binary=llama_shim(tmp_path), args=["--threads-http", "3"])
        },
        env={
            "FAKE_VLLM_STATS": "1",
            "FAKE_VLLM_TOKEN_DELAY": "0.2",
            "FAKE_VLLM_LOAD_SECONDS": "0.1",
        },
    )
    assert chat(swapper, "a").status_code == 200
    clients = 3 * limit
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda _: chat(swapper, "a"), range(clients)))
    assert [a.status_code for a in answers] == [200] * clients
    seen = stats(swapper, "a")
    assert seen["served"] == clients + 1
    # Reached, never passed: the requests beyond it waited in swapper for a free connection.
    assert (seen["max_connections"], seen["max_in_flight"]) == (limit, limit), seen


def test_a_request_on_a_connection_the_backend_dropped_is_sent_again(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    # Every request on a reused connection finds it closed, as when the backend's keep-alive
    # timeout crosses the request: no response at all, only the close.
    swapper = swapper_factory(
        models={"a": vllm("org/a")},
        env={"FAKE_VLLM_STATS": "1", "FAKE_VLLM_DROP_IDLE": "0", "FAKE_VLLM_LOAD_SECONDS": "0.1"},
    )
    first = chat(swapper, "a")
    assert first.status_code == 200
    second = chat(swapper, "a")  # sent on the kept-alive connection first
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"]["content"] == "vllm a says: hi"
    seen = stats(swapper, "a")
    assert (seen["dropped"], seen["served"]) == (1, 2), seen  # each request ran once


def test_a_frozen_backend_ends_the_stream_and_is_killed_then_restarted(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    read, health, delay = 1.0, 0.5, 0.1
    swapper = swapper_factory(
        models={"a": vllm("org/a")},
        timeouts={"read": read, "health": health},
        env={"FAKE_VLLM_TOKEN_DELAY": str(delay), "FAKE_VLLM_LOAD_SECONDS": "0.1"},
    )
    assert chat(swapper, "a").status_code == 200
    pid = swapper.model("a")["pid"]
    frozen_at: list[float] = []

    def freeze() -> None:
        os.kill(pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    try:
        events = stream_events(swapper, "a", words(200), on_first=freeze)  # 20 s of tokens
        ended = time.monotonic()
        error = events[-1][1].get("error")
        assert error is not None, f"the stream ended without an error event: {events[-1]}"
        assert error["code"] == "backend_timeout" and "timeouts.read" in error["message"]
        assert ended - frozen_at[0] < read + SLACK, "not ended by timeouts.read"
        failed = swapper.wait_status("a", "FAILED", timeout=read + health + SLACK)
        assert "froze" in failed["last_error"], failed
        wait_until(lambda: process_state(pid) is None, SLACK, "the frozen backend to be killed")
    finally:
        if process_state(pid) is not None:  # let a backend swapper failed to kill exit
            os.kill(pid, signal.SIGCONT)
    answer = chat(swapper, "a")
    assert answer.status_code == 200, answer.text
    assert swapper.model("a")["pid"] not in (None, pid)


def test_a_request_cut_off_by_an_eviction_gets_model_evicted(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    drain = 0.5
    # 0.6 of the fake GPU each: a and b cannot both be resident, though two slots are free.
    swapper = swapper_factory(
        swapper={"mode": "multi-active", "max_concurrent_models": 2, "drain_timeout": drain},
        models={m: vllm(f"org/{m}", gpu_memory_utilization=0.6) for m in "ab"},
        env={**gpu_env(tmp_path), "FAKE_VLLM_STATS": "1", "FAKE_VLLM_TOKEN_DELAY": "0.2"},
    )
    assert chat(swapper, "a").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(
            lambda: swapper.http.post(
                "/v1/chat/completions",
                json={"model": "a", "messages": [{"role": "user", "content": words(100)}]},
            )
        )  # 20 s
        wait_until(lambda: stats(swapper, "a")["in_flight"] == 1, 10, "a to be generating")
        assert chat(swapper, "b").status_code == 200
        cut = long.result(timeout=SLACK + drain)
    assert cut.status_code == 503, cut.text
    error = cut.json()["error"]
    assert error["code"] == "model_evicted"
    assert "'a'" in error["message"] and f"drain_timeout ({drain:g}s)" in error["message"]
    assert swapper.model("a")["status"] == "UNLOADED"
