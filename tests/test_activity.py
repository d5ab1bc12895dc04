"""``GET /activity`` and the history ``/events`` replays, against a real swapper on real
llama-servers: recent requests with their tokens, swaps, loads, errors and samples."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from swapper.http.activity import next_edge
from tests.conftest import MESSAGES, SwapperProcess, seconds, tiny_model, wait_until

pytestmark = pytest.mark.integration

KEY = "activity-key"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


@pytest.fixture
def served(swapper_factory: Any, llama_server: str) -> Iterator[SwapperProcess]:
    """swapper with tiny-a, tiny-b and a model whose file is no model; one-second samples,
    three requests kept, behind an API key."""
    workdir: Path = swapper_factory.workdir
    (workdir / "broken.gguf").write_bytes(b"not a gguf file")
    config = {
        "swapper": {
            "mode": "single-active",
            "gpu_enabled": False,
            "model_swap_timeout": 30,
            "stop_timeout": 5,
            "shutdown_timeout": 5,
            "max_start_failures": 1,
        },
        "server": {
            "host": "127.0.0.1",
            "port": 1,
            "api_keys": ["plain-key"],
            "admin_api_keys": [KEY],
        },
        "activity": {"requests": 3, "sample_seconds": 1},
        "models": {
            "tiny-a": tiny_model(workdir, "a", ctx_size=512, aliases=["a"]),
            "tiny-b": tiny_model(workdir, "b", ctx_size=512),
            "broken": {"backend": "llamacpp", "model_path": str(workdir / "broken.gguf")},
        },
    }
    process = SwapperProcess(config, workdir, llama_server)
    process.http.headers["Authorization"] = f"Bearer {KEY}"
    try:
        yield process
    finally:
        process.stop()


def _activity(swapper: SwapperProcess, **params: Any) -> dict[str, Any]:
    response = swapper.http.get("/activity", params=params)
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


def test_activity_keeps_requests_with_their_tokens(served: SwapperProcess) -> None:
    swapper = served
    chat = swapper.http.post(
        "/v1/chat/completions",
        headers={"X-Request-Id": "req-chat"},
        json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 4},
    )
    assert chat.status_code == 200
    usage = chat.json()["usage"]
    with swapper.http.stream(
        "POST",
        "/v1/chat/completions",
        headers={"X-Request-Id": "req-sse"},
        json={
            "model": "a",  # an alias: recorded under the model's id
            "messages": MESSAGES,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as stream:
        events = [
            json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")
        ]
    streamed_usage = next(e["usage"] for e in reversed(events) if e.get("usage"))
    missing = swapper.http.post(
        "/v1/chat/completions",
        headers={"X-Request-Id": "req-404"},
        json={"model": "nope", "messages": MESSAGES},
    )
    assert missing.status_code == 404
    swapper.http.get("/status")  # operators' reads are not activity

    doc = _activity(swapper)
    requests = {r["request_id"]: r for r in doc["requests"]}
    assert list(requests) == ["req-chat", "req-sse", "req-404"]  # oldest first
    plain, sse = requests["req-chat"], requests["req-sse"]
    for record in (plain, sse):
        assert record["model"] == "tiny-a"
        assert record["endpoint"] == "/v1/chat/completions" and record["method"] == "POST"
        assert record["status"] == "200"
        assert ISO_MS.match(record["time"])
        assert 0 <= record["ttfb_s"] <= record["duration_s"]
        assert re.match(r"^127\.0\.0\.1:\d+$", record["client"])
        assert record["tokens_per_s"] > 0
    assert plain["prompt_tokens"] == usage["prompt_tokens"]
    assert plain["completion_tokens"] == usage["completion_tokens"]
    assert sse["prompt_tokens"] == streamed_usage["prompt_tokens"]
    assert sse["completion_tokens"] == streamed_usage["completion_tokens"]
    assert requests["req-404"]["status"] == "404" and requests["req-404"]["model"] is None
    assert requests["req-404"]["completion_tokens"] is None

    # The ring keeps the newest three.
    for n in range(2):
        swapper.http.post(
            "/v1/chat/completions",
            headers={"X-Request-Id": f"req-more-{n}"},
            json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 1},
        )
    ids = [r["request_id"] for r in _activity(swapper)["requests"]]
    assert ids == ["req-404", "req-more-0", "req-more-1"]
    assert [r["request_id"] for r in _activity(swapper, limit=1)["requests"]] == ["req-more-1"]

    summary = _activity(swapper)["models"]["tiny-a"]
    assert summary["loads_today"] == 1 and summary["mean_load_s"] > 0
    assert summary["tokens_per_s"] > 0 and ISO_MS.match(summary["last_request"])

    # Samples come every second; one of them counts the requests above.
    def counted() -> bool:
        samples = _activity(swapper)["samples"]
        return sum(s["requests"].get("tiny-a", 0) for s in samples) == 4

    wait_until(counted, seconds(30), "the samples to count tiny-a's four requests")
    sample = _activity(swapper)["samples"][-1]
    assert set(sample) == {
        "time",
        "seconds",
        "requests",
        "tokens_per_s",
        "queue_depth",
        "resident",
        "vram_mb",
    }
    assert sample["resident"] == ["tiny-a"] and sample["queue_depth"] == 0
    assert sample["vram_mb"] == {}  # no GPU here


def test_activity_keeps_swaps_loads_and_errors(served: SwapperProcess) -> None:
    swapper = served
    assert swapper.http.post("/models/tiny-a/load").status_code == 200
    assert swapper.http.post("/models/tiny-b/load").status_code == 200
    assert swapper.http.post("/models/broken/load").status_code == 503
    doc = _activity(swapper)
    swaps = [(s["from"], s["to"], s["reason"]) for s in doc["swaps"]]
    assert swaps == [(None, "tiny-a", "manual"), ("tiny-a", "tiny-b", "manual")]
    assert all(s["seconds"] > 0 and ISO_MS.match(s["time"]) for s in doc["swaps"])
    loads = [(entry["kind"], entry["model"]) for entry in doc["loads"]]
    assert loads[:3] == [("loaded", "tiny-a"), ("unloaded", "tiny-a"), ("loaded", "tiny-b")]
    failed = [e for e in doc["errors"] if e["kind"] == "model"]
    assert [e["model"] for e in failed] == ["broken"] and failed[0]["message"]
    assert doc["models"]["tiny-b"]["loads_today"] == 1


def test_events_replay_the_history_first(served: SwapperProcess) -> None:
    swapper = served
    assert swapper.http.post("/models/tiny-a/load").status_code == 200
    received: list[tuple[str, dict[str, Any]]] = []
    # The history follows the snapshot at once; a silent stream would only ping after 15 s.
    with swapper.http.stream("GET", "/events", timeout=seconds(10)) as stream:
        kind = ""
        try:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    received.append((kind, json.loads(line[6:])))
                    if kind == "swap":
                        break
        except httpx.ReadTimeout:
            pytest.fail(f"no swap replayed after the snapshot; received {received}")
    assert received[0][0] == "snapshot"
    assert received[0][1]["models"]["tiny-a"]["status"] == "LOADED"
    history = received[1:]
    assert all(data["history"] is True for _, data in history)
    assert ("status", "LOADING") in [(kind, data.get("status")) for kind, data in history]
    assert history[-1][1]["to"] == "tiny-a" and history[-1][1]["reason"] == "manual"


def test_activity_needs_a_key_and_a_sane_limit(served: SwapperProcess) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as anonymous:
        refused = anonymous.get("/activity")
    assert refused.status_code == 401
    assert refused.json()["error"]["message"].startswith("Missing API key")
    bad = served.http.get("/activity", params={"limit": 0})
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "message": "limit: must be >= 1",
        "type": "invalid_request_error",
        "param": "limit",
        "code": None,
    }


def test_stream_usage_reads_only_the_last_events() -> None:
    from swapper.http.activity import Usage, body_usage, stream_usage

    # llama.cpp's last chunk carries `timings`; OpenAI's usage chunk (choices: []) follows it.
    tail = (
        b'data: {"choices":[{"delta":{},"finish_reason":"length"}],'
        b'"timings":{"prompt_n":3,"predicted_n":5,"predicted_per_second":41.5}}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert stream_usage(tail) == Usage(7, 5, 41.5)
    # Without a usage chunk: llama.cpp's timings alone (prompt tokens: evaluated + cached).
    timings_only = (
        b'data: {"choices":[],"timings":{"cache_n":24,"prompt_n":1,"predicted_n":3,'
        b'"predicted_per_second":60.5}}\n\ndata: [DONE]\n\n'
    )
    assert stream_usage(timings_only) == Usage(25, 3, 60.5)
    assert stream_usage(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n') is None
    assert stream_usage(b'data: {"usage": "nonsense"}\n\n') is None
    # Anthropic's names, in a whole body.
    assert body_usage(b'{"usage":{"input_tokens":2,"output_tokens":9}}') == Usage(2, 9, None)
    assert body_usage(b"[1, 2]") is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"requests": 0}, "$.activity.requests: must be >= 1"),
        ({"sample_seconds": 0}, "$.activity.sample_seconds: must be a number > 0"),
        ({"samples": "many"}, "$.activity.samples: expected int, got str"),
        ({"bogus": 1}, "$.activity.bogus: unknown key"),
    ],
)
def test_activity_settings_are_checked(section: dict[str, Any], message: str) -> None:
    from swapper.backends.registry import load_backends
    from swapper.config import parse_config
    from swapper.errors import ConfigError

    schemas = load_backends().schemas()
    with pytest.raises(ConfigError) as caught:
        parse_config({"activity": section, "models": {}}, "x.yaml", schemas)
    assert str(caught.value).startswith(f"x.yaml: {message}"), caught.value


def test_a_sample_is_due_once_an_edge_even_when_its_timer_fires_early() -> None:
    # The first edge is the next whole interval after now.
    assert next_edge(None, 1000.2, 60) == 1020.0
    assert next_edge(None, 1019.9999, 60) == 1020.0
    # A timer that fired half a millisecond before the edge 1020: the clock still says 1019.9995,
    # which is before 1020 once more; the next sample is due at 1080, not again at 1020.
    assert next_edge(1020.0, 1019.9995, 60) == 1080.0
    # On time, or late: the next edge after the clock, never one already past.
    assert next_edge(1020.0, 1020.001, 60) == 1080.0
    assert next_edge(1020.0, 1150.0, 60) == 1200.0
