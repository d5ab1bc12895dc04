"""The operators' view: metrics, live events, backend logs, loading feedback, JSON logs."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from swapper.upstream.client import normalise_error
from tests.conftest import (
    MESSAGES,
    FakeApp,
    SwapperProcess,
    chat,
    sdk,
    tiny_model,
    wait_until,
)
from tests.fakes import Behaviour, FakeWorld

# -- metrics, on fakes ----------------------------------------------------------------------------


@pytest.fixture
async def fake_client(fake_app: FakeApp) -> AsyncIterator[AsyncTestClient[Any]]:
    """Models a and b answering REPLY, with an admin key sent on every request."""
    async with fake_app({"a": {}, "b": {}}, server={"admin_api_keys": ["k"]}) as client:
        client.headers["Authorization"] = "Bearer k"
        yield client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.anyio
async def test_metrics_count_a_scripted_sequence_of_swaps(
    fake_client: AsyncTestClient[Any], world: FakeWorld
) -> None:
    async def ask(model: str) -> int:
        response = await fake_client.post(
            "/v1/chat/completions", json={"model": model, "messages": MESSAGES}
        )
        return response.status_code

    assert await ask("a") == 200  # load a (request)
    assert await ask("a") == 200
    assert await ask("b") == 200  # swap a -> b (request)
    assert (await fake_client.post("/models/a/load")).status_code == 200  # b -> a (manual)
    world.crash("a")  # the app runs on the test client's own loop and thread
    deadline = time.monotonic() + 10
    while (await fake_client.get("/status")).json()["models"]["a"]["status"] != "FAILED":
        assert time.monotonic() < deadline, "the crash was not noticed"
    assert await ask("a") == 200  # restart after the crash
    assert await ask("nope") == 404

    del fake_client.headers["Authorization"]
    metrics = await fake_client.get("/metrics")
    assert metrics.status_code == 200  # open by default, even with API keys configured
    assert metrics.headers["content-type"].startswith("text/plain")
    got = samples(metrics.text)

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("swapper_swaps_total", **{"from": "", "to": "a", "reason": "request"}) == 1
    assert value("swapper_swaps_total", **{"from": "a", "to": "b", "reason": "request"}) == 1
    assert value("swapper_swaps_total", **{"from": "b", "to": "a", "reason": "manual"}) == 1
    assert value("swapper_swaps_total", **{"from": "", "to": "a", "reason": "crashed"}) == 1
    assert sum(v for (name, _), v in got.items() if name == "swapper_swaps_total") == 4
    assert value("swapper_backend_restarts_total", model="a") == 1
    assert value("swapper_load_seconds_count", model="a") == 3
    assert value("swapper_load_seconds_count", model="b") == 1
    assert value("swapper_unload_seconds_count", model="a") == 1
    assert value("swapper_unload_seconds_count", model="b") == 1
    chat_path = "/v1/chat/completions"
    assert value("swapper_requests_total", model="a", endpoint=chat_path, status="200") == 3
    assert value("swapper_requests_total", model="b", endpoint=chat_path, status="200") == 1
    assert value("swapper_requests_total", model="", endpoint=chat_path, status="404") == 1
    assert value("swapper_time_to_first_byte_seconds_count", model="a") == 3
    assert value("swapper_model_status", model="a", status="LOADED") == 1
    assert value("swapper_model_status", model="a", status="FAILED") == 0
    assert value("swapper_model_status", model="b", status="UNLOADED") == 1
    assert value("swapper_queue_depth", model="a") == 0
    assert not [name for (name, _) in got if not name.startswith("swapper_")]
    # No GPU here: no GPU memory series, rather than made-up ones.
    assert not [name for (name, _) in got if name.startswith("swapper_gpu_")]


@pytest.mark.anyio
async def test_requests_total_counts_every_request_and_failed_streams(
    fake_client: AsyncTestClient[Any], world: FakeWorld
) -> None:
    assert (await fake_client.get("/v1/models")).status_code == 200
    world.queue("a", Behaviour.FAIL_START)
    failed = await fake_client.post(
        "/v1/chat/completions", json={"model": "a", "messages": MESSAGES, "stream": True}
    )
    assert failed.status_code == 200 and '"error"' in failed.text  # 200, then an error event
    assert (
        await fake_client.post("/v1/chat/completions", json={"model": "b", "messages": MESSAGES})
    ).status_code == 200
    got = samples((await fake_client.get("/metrics")).text)

    def value(**labels: str) -> float:
        return got.get(("swapper_requests_total", tuple(sorted(labels.items()))), 0.0)

    chat_path = "/v1/chat/completions"
    assert value(model="", endpoint="/v1/models", status="200") == 1
    assert value(model="a", endpoint=chat_path, status="stream_error") == 1
    assert value(model="a", endpoint=chat_path, status="200") == 0
    assert value(model="b", endpoint=chat_path, status="200") == 1


@pytest.mark.anyio
async def test_requests_total_counts_unknown_paths(fake_client: AsyncTestClient[Any]) -> None:
    assert (await fake_client.get("/no/such/path")).status_code == 404
    got = samples((await fake_client.get("/metrics")).text)
    labels = (("endpoint", "unmatched"), ("model", ""), ("status", "404"))
    assert (
        got.get(
            ("swapper_requests_total_total", labels), got.get(("swapper_requests_total", labels))
        )
        == 1
    )


@pytest.mark.integration
def test_unload_racing_a_reload_that_removes_the_model(
    swapper_factory: Any, tmp_path: Path
) -> None:
    slow = tmp_path / "slow-llama-server"
    slow.write_text("#!/bin/sh\necho loading a very large model\nexec sleep 600\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    models = {
        f"tiny-{name}": tiny_model(swapper_factory.workdir, name, ctx_size=512, binary=str(slow))
        for name in "ab"
    }
    swapper = swapper_factory(models=models, swapper={"model_swap_timeout": 3})
    with (
        httpx.Client(base_url=swapper.url, timeout=30) as client,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        loading = pool.submit(client.post, "/models/tiny-a/load")
        swapper.wait_status("tiny-a", "LOADING")
        unloading = pool.submit(client.post, "/models/tiny-a/unload")
        wait_until(
            lambda: (
                "POST /models/tiny-a/unload" not in swapper.output()
                and swapper.model("tiny-a")["status"] == "LOADING"
            ),
            5,
            "the unload to wait",
        )
        config = yaml.safe_load(swapper.config_path.read_text())
        del config["models"]["tiny-a"]
        swapper.config_path.write_text(yaml.safe_dump(config))
        assert client.post("/admin/reload").json()["removed"] == ["tiny-a"]
        answers = [loading.result(timeout=30), unloading.result(timeout=30)]
    for response in answers:
        assert response.status_code != 500, response.text
        assert response.headers["content-type"].startswith("application/json")
    assert answers[1].status_code == 200
    assert answers[1].json()["model"] == "tiny-a" and answers[1].json()["status"] == "UNLOADED"
    assert "Traceback" not in swapper.output()


def test_upstream_errors_keep_an_openai_type_and_a_string_or_null_code() -> None:
    llama = normalise_error(400, b'{"error":{"code":400,"message":"bad","type":"not_found_error"}}')
    assert json.loads(llama)["error"] == {
        "message": "bad",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    kept = json.loads(
        normalise_error(
            429, b'{"error":{"message":"slow","type":"rate_limit_error","code":"too_many"}}'
        )
    )["error"]
    assert (kept["type"], kept["code"]) == ("rate_limit_error", "too_many")
    assert json.loads(normalise_error(502, b"oops"))["error"]["type"] == "server_error"


@pytest.mark.anyio
async def test_metrics_can_require_a_key(fake_app: FakeApp) -> None:
    server = {"api_keys": ["k"], "metrics_require_key": True}
    async with fake_app({"a": {}}, server=server, reply=None) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"x-api-key": "k"})).status_code == 200


@pytest.mark.anyio
async def test_status_reports_no_gpu_and_no_vram(fake_client: AsyncTestClient[Any]) -> None:
    await fake_client.post("/models/a/load")
    status = (await fake_client.get("/status")).json()
    assert status["gpu"] == {"available": False, "gpus": []}
    assert status["models"]["a"]["vram_mb"] is None


# -- live events, logs, feedback, on real llama-server ----------------------------------------------


def read_events(swapper: SwapperProcess, until: Any, timeout: float = 30) -> list[tuple[str, dict]]:
    """Read /events until ``until(events)`` holds; returns (type, data) pairs."""
    events: list[tuple[str, dict]] = []
    with httpx.Client(base_url=swapper.url, timeout=timeout) as client:
        with client.stream("GET", "/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind:
                    events.append((kind, json.loads(line[len("data: ") :])))
                    if until(events):
                        return events
    raise AssertionError(f"the event stream ended early: {events}")


@pytest.mark.integration
def test_events_stream_status_changes_and_swaps(swapper_factory: Any) -> None:
    swapper = swapper_factory(swapper={"default_model": "tiny-a"})
    swapper.wait_status("tiny-a", "LOADED")
    loader = threading.Timer(0, lambda: swapper.http.post("/models/tiny-b/load"))

    def swapped(events: list[tuple[str, dict]]) -> bool:
        if len(events) == 1:
            loader.start()  # the snapshot arrived: we are subscribed, now cause the swap
        # (The replayed history, marked as such, may hold the startup's swap: not this one.)
        return any(kind == "swap" and not data.get("history") for kind, data in events)

    events = read_events(swapper, swapped)
    loader.join()
    assert events[0][0] == "snapshot"
    assert events[0][1]["models"]["tiny-a"]["status"] == "LOADED"
    live = [(kind, d) for kind, d in events if not d.get("history")]
    changes = [(d["model"], d["status"]) for kind, d in live if kind == "status"]
    assert changes == [
        ("tiny-a", "UNLOADING"),
        ("tiny-a", "UNLOADED"),
        ("tiny-b", "LOADING"),
        ("tiny-b", "LOADED"),
    ]
    swap = next(d for kind, d in live if kind == "swap")
    assert swap["from"] == "tiny-a" and swap["to"] == "tiny-b" and swap["reason"] == "manual"
    assert 0 < swap["seconds"] < 30


@pytest.mark.integration
def test_model_logs_tail_and_follow(swapper_factory: Any) -> None:
    swapper = swapper_factory(swapper={"default_model": "tiny-a"})
    swapper.wait_status("tiny-a", "LOADED")
    tail = swapper.http.get("/models/tiny-a/logs", params={"lines": 5}).json()
    assert tail["model"] == "tiny-a" and 0 < len(tail["lines"]) <= 5
    everything = swapper.http.get("/models/a/logs").json()["lines"]  # by alias too
    assert any("llama_server" in line or "srv" in line for line in everything)

    with httpx.Client(base_url=swapper.url, timeout=30) as client:
        with client.stream(
            "GET", "/models/tiny-a/logs", params={"follow": 1, "lines": 0}
        ) as response:
            lines = response.iter_lines()
            # Cause new output: a request makes llama-server log its slot work.
            threading.Thread(target=lambda: chat(swapper, "tiny-a")).start()
            followed = []
            for line in lines:
                if line.startswith("data: "):
                    followed.append(json.loads(line[len("data: ") :])["line"])
                    if any("slot" in entry for entry in followed):
                        break
    assert any("slot" in entry for entry in followed)


def slow_llama_server(tmp_path: Path, llama_server: str, seconds: float) -> str:
    """A llama-server that takes ``seconds`` longer to start, like a big model would."""
    script = tmp_path / "slow-llama-server"
    script.write_text(f'#!/bin/sh\nsleep {seconds}\nexec {llama_server} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["comments", "reasoning"])
def test_loading_feedback_keeps_the_answer_unchanged(
    swapper_factory: Any, tmp_path: Path, llama_server: str, mode: str
) -> None:
    binary = slow_llama_server(tmp_path, llama_server, 1.5)
    models = {"tiny-a": tiny_model(swapper_factory.workdir, "a", binary=binary, ctx_size=512)}
    swapper = swapper_factory(
        models=models, swapper={"loading_feedback": mode, "loading_feedback_interval": 0.2}
    )
    client = sdk(swapper)
    request = {
        "model": "tiny-a",
        "messages": MESSAGES,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    raw: list[str] = []
    if mode == "comments":
        with swapper.http.stream("POST", "/v1/chat/completions", json=request) as response:
            raw = list(response.iter_lines())
        comments = [line for line in raw if line.startswith(": loading tiny-a ")]
        assert len(comments) >= 3, raw[:10]  # 1.5 s of loading at one comment per 0.2 s
        cold = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in raw
            if line.startswith("data: {") and json.loads(line[6:])["choices"]
        )
        swapper.http.post("/models/tiny-a/unload")
        chunks = list(client.chat.completions.create(**request))  # the SDK sees no comment
        cold_sdk = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert cold_sdk == cold
    else:
        chunks = list(client.chat.completions.create(**request))
        thinking = [
            getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks if c.choices
        ]
        assert sum(1 for t in thinking if t and t.startswith("Loading tiny-a")) >= 3
        cold = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    warm_chunks = list(client.chat.completions.create(**request))  # resident: no feedback
    warm = "".join(c.choices[0].delta.content or "" for c in warm_chunks if c.choices)
    assert not any(
        getattr(c.choices[0].delta, "reasoning_content", None) for c in warm_chunks if c.choices
    )
    assert cold == warm and len(warm) > 0


@pytest.mark.integration
def test_json_logs_carry_the_request_id(swapper_factory: Any) -> None:
    swapper = swapper_factory(
        models={"tiny-a": tiny_model(swapper_factory.workdir, "a", ctx_size=512)},
        server={"log_format": "json"},
    )
    response = swapper.http.post(
        "/v1/chat/completions",
        headers={"X-Request-Id": "req-42"},
        json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    generated = swapper.http.get("/health").headers["x-request-id"]
    assert len(generated) == 16 and generated != "req-42"
    wait_until(
        lambda: "Default" in swapper.output() or "loaded in" in swapper.output(),
        10,
        "the load to be logged",
    )
    records = [json.loads(line) for line in swapper.output().splitlines() if line.startswith("{")]
    assert records and all(
        {"time", "level", "logger", "message", "request_id"} <= set(r) for r in records
    )
    assert any(r["request_id"] == "req-42" and "Starting tiny-a" in r["message"] for r in records)
    assert not [
        line for line in swapper.output().splitlines() if line.strip() and not line.startswith("{")
    ]


@pytest.mark.integration
def test_open_streams_do_not_hold_up_shutdown(swapper_factory: Any) -> None:
    swapper = swapper_factory(swapper={"default_model": "tiny-a", "shutdown_timeout": 60})
    swapper.wait_status("tiny-a", "LOADED")
    with httpx.Client(base_url=swapper.url, timeout=60) as client:
        with (
            client.stream("GET", "/events") as events,
            client.stream("GET", "/models/tiny-a/logs", params={"follow": 1}) as logs,
        ):
            event_lines, log_lines = events.iter_lines(), logs.iter_lines()
            assert next(event_lines).startswith("event: snapshot")
            assert next(log_lines).startswith("data: ")
            swapper.signal(signal.SIGTERM)
            # Both streams end as shutdown begins, long before the 60 s grace period.
            list(event_lines)
            list(log_lines)
    swapper.proc.wait(timeout=20)
    assert "Swapper Service stopped" in swapper.output()
    assert "Exception in ASGI application" not in swapper.output()
    assert swapper.backends() == []
