"""swapper end to end: a real `swapper serve`, real llama-server backends, the official SDK."""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MESSAGES, SwapperProcess, process_state, sdk, wait_until

pytestmark = pytest.mark.integration


def test_non_stream_chat(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    reply = sdk(swapper).chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=8)
    assert reply.object == "chat.completion"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert swapper.model("tiny-a")["status"] == "LOADED"


def test_stream_with_usage_keeps_the_chunk_order(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    chunks = list(
        sdk(swapper).chat.completions.create(
            model="a",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert finish[0] == len(chunks) - 2  # finish chunk, then the usage chunk, then [DONE]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 0


def test_stream_is_raw_sse_ending_with_done(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with swapper.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        raw = response.read().decode()
    events = [line for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        json.loads(event[len("data: ") :])


def test_completions_endpoint(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    reply = sdk(swapper).completions.create(model="tiny-b", prompt="abc", max_tokens=4)
    assert isinstance(reply.choices[0].text, str)


def test_unknown_model_is_not_found(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    with pytest.raises(openai.NotFoundError) as info:
        sdk(swapper).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"


def test_models_lists_unloaded_models_without_loading(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    ids = [m.id for m in sdk(swapper).models.list()]
    assert ids == ["tiny-a", "tiny-b", "tiny-c"]
    assert {m["status"] for m in swapper.status()["models"].values()} == {"UNLOADED"}
    assert swapper.backends() == []


def test_swaps_a_b_a_stop_the_old_process(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    client = sdk(swapper)
    seen: list[int] = []
    for model in ("tiny-a", "tiny-b", "tiny-a"):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        status = swapper.status()
        assert status["active_model"] == model
        pid = status["models"][model]["pid"]
        assert status["models"][model]["status"] == "LOADED"
        others = [m for m in status["models"].values() if m["status"] != "UNLOADED"]
        assert len(others) == 1
        if seen:
            assert process_state(seen[-1]) is None, "the previous backend is still running"
        assert swapper.backends() == [pid]
        seen.append(pid)
    assert len(set(seen)) == 3


def test_default_model_is_warm_at_startup(swapper_factory: Any) -> None:
    swapper = swapper_factory(swapper={"default_model": "tiny-b"})
    loaded = swapper.wait_status("tiny-b", "LOADED")
    assert swapper.backends() == [loaded["pid"]]
    log = swapper.output()
    for line in (
        "Initializing Swapper Service...",
        "Loaded 3 models into Swapper",
        "Swapper Service initialized with 3 models",
        "Loading default model: tiny-b",
        "Default model loaded: tiny-b",
    ):
        assert line in log


def test_backend_output_is_logged_with_the_model_id_at_debug(swapper_factory: Any) -> None:
    swapper = swapper_factory(env={"SWAPPER_LOG_LEVEL": "DEBUG"})
    sdk(swapper).chat.completions.create(model="tiny-c", messages=MESSAGES, max_tokens=2)
    assert "[tiny-c] " in swapper.output()


def test_kill_9_of_a_backend_then_a_successful_request(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    client = sdk(swapper)
    client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=2)
    pid = swapper.model("tiny-a")["pid"]
    os.kill(pid, signal.SIGKILL)
    failed = swapper.wait_status("tiny-a", "FAILED")
    assert "backend died" in failed["last_error"] and "signal 9" in failed["last_error"]
    reply = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=2)
    assert reply.choices
    restarted = swapper.model("tiny-a")
    assert restarted["status"] == "LOADED" and restarted["pid"] != pid


def long_stream_swapper(swapper_factory: Any) -> SwapperProcess:
    """One slot with a long context: a 16000-token stream runs for many seconds here."""
    return swapper_factory(
        models={
            "tiny-a": {
                "backend": "llamacpp",
                "model_path": str(swapper_factory.workdir / "tiny-a.gguf"),
                "ctx_size": 16384,
                "args": ["-np", "1"],
            }
        }
    )


def backend_printed(swapper: SwapperProcess, model: str, words: str) -> bool:
    """True once the model's backend printed ``words`` (its lines reach swapper's log only at
    DEBUG; the model's own log keeps them)."""
    lines = swapper.http.get(f"/models/{model}/logs", params={"lines": 1000}).json()["lines"]
    return any(words in line for line in lines)


LONG_STREAM = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 16000, "stream": True}


def test_client_disconnect_cancels_the_upstream_request(swapper_factory: Any) -> None:
    swapper = long_stream_swapper(swapper_factory)
    with httpx.Client(base_url=swapper.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=LONG_STREAM) as response:
            lines = response.iter_lines()  # keep a reference: a dropped iterator hangs up
            assert next(lines).startswith("data: ")
            assert swapper.model("tiny-a")["in_flight"] == 1
    # The client hung up seconds before the 16000 tokens could be done: swapper frees the
    # request and closes its upstream connection, and llama-server cancels the generation.
    wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 0, 10, "in_flight to drop")
    wait_until(
        lambda: backend_printed(swapper, "tiny-a", "cancel task"),
        10,
        "llama-server to cancel the task",
    )
    assert swapper.model("tiny-a")["status"] == "LOADED"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_leaves_no_backend(swapper_factory: Any, sig: signal.Signals) -> None:
    swapper = swapper_factory(swapper={"default_model": "tiny-a"})
    pid = swapper.wait_status("tiny-a", "LOADED")["pid"]
    swapper.signal(sig)
    # uvicorn re-raises the signal after its graceful shutdown, so the parent sees it
    assert swapper.proc.wait(timeout=30) in (-sig, 128 + sig), swapper.output()
    assert process_state(pid) is None
    assert swapper.backends() == []
    assert "Swapper Service stopped" in swapper.output()


def test_sigkill_of_swapper_takes_its_backends_down(swapper_factory: Any) -> None:
    swapper = swapper_factory(swapper={"default_model": "tiny-a"})
    pid = swapper.wait_status("tiny-a", "LOADED")["pid"]
    swapper.signal(signal.SIGKILL)
    swapper.proc.wait(timeout=10)
    wait_until(lambda: process_state(pid) is None, 10, "the orphaned backend to die")
    assert swapper.backends() == []


def test_in_flight_stream_finishes_on_sigterm(swapper_factory: Any) -> None:
    swapper = swapper_factory(
        swapper={"shutdown_timeout": 60},
        models={
            "tiny-a": {
                "backend": "llamacpp",
                "model_path": str(swapper_factory.workdir / "tiny-a.gguf"),
                "ctx_size": 4096,
                "args": ["-np", "1", "-t", "1"],  # one thread: no spin-waits when a core is busy
            }
        },
    )
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 3000, "stream": True}
    with swapper.http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        assert swapper.model("tiny-a")["in_flight"] == 1  # still running when the signal comes
        swapper.signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert len(rest) > 10  # tokens kept coming after the signal
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]  # it ran to its natural end after the signal
    assert swapper.proc.wait(timeout=30) == -signal.SIGTERM
    assert swapper.backends() == []


def test_load_failure_is_503_with_the_backends_words(swapper_factory: Any, tmp_path: Any) -> None:
    missing = tmp_path / "run" / "not-a-model.gguf"
    missing.write_bytes(b"not a GGUF model")  # it exists, so only llama-server can refuse it
    swapper = swapper_factory(
        models={
            "broken": {"backend": "llamacpp", "model_path": str(missing)},
        }
    )
    with pytest.raises(openai.InternalServerError) as info:
        sdk(swapper).chat.completions.create(model="broken", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"]
    failed = swapper.model("broken")
    assert failed["status"] == "FAILED"
    assert "exited with status" in failed["last_error"]
    assert swapper.backends() == []


def test_client_disconnect_during_a_non_stream_request_cancels_it(swapper_factory: Any) -> None:
    swapper = long_stream_swapper(swapper_factory)
    body = json.dumps({**LONG_STREAM, "stream": False}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", swapper.port)) as sock:
        sock.sendall(request + body)
        wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 1, 30, "the request to start")
    # Hung up long before 16000 tokens: the generation is cancelled and the slot freed.
    wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 0, 10, "in_flight to drop")
    wait_until(
        lambda: backend_printed(swapper, "tiny-a", "cancel task"),
        10,
        "llama-server to cancel the task",
    )
    # Its access-log line says the client left (499), and why the work stopped.
    wait_until(lambda: "499 model=tiny-a" in swapper.output(), 10, "the access-log line")
    assert "client went away; request for tiny-a cancelled" in swapper.output()
    assert swapper.model("tiny-a")["status"] == "LOADED"


def test_multi_active_keeps_two_llama_servers_and_evicts_the_least_recently_used(
    swapper_factory: Any,
) -> None:
    swapper = swapper_factory(swapper={"mode": "multi-active", "max_concurrent_models": 2})
    client = sdk(swapper)
    for model in ("a", "b", "a"):  # b is now the least recently used
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert swapper.status()["resident"] == ["tiny-a", "tiny-b"]
    assert len(swapper.backends()) == 2
    pid_a, pid_b = swapper.model("tiny-a")["pid"], swapper.model("tiny-b")["pid"]
    client.chat.completions.create(model="c", messages=MESSAGES, max_tokens=2)
    doc = swapper.status()
    assert {m: doc["models"][m]["status"] for m in doc["models"]} == {
        "tiny-a": "LOADED",
        "tiny-b": "UNLOADED",
        "tiny-c": "LOADED",
    }
    assert doc["models"]["tiny-a"]["pid"] == pid_a  # untouched by the eviction
    assert process_state(pid_b) is None
    assert len(swapper.backends()) == 2
