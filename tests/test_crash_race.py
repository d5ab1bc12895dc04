"""A backend that died a moment ago, before swapper noticed, is restarted: never a 502.

Nothing reached the dead backend (the connection was refused, or a pooled keep-alive
connection was reset before a byte came back), so swapper sends the request once more, after
the crash is noticed and the model restarted.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import httpx
import pytest

from tests.conftest import MESSAGES, chat, process_state, wait_until

pytestmark = pytest.mark.integration

ROUNDS = 15


def _kill_backend(swapper: Any, model_id: str) -> int:
    pid = swapper.model(model_id)["pid"]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return int(pid)


def test_requests_right_after_a_backend_is_killed_are_served(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    # Keep-alive: the request after a kill often goes out on a pooled connection to the corpse.
    assert chat(swapper, "tiny-a").status_code == 200
    answers = []
    for _ in range(ROUNDS):
        if swapper.model("tiny-a")["status"] != "LOADED":  # a round that failed left it down
            assert chat(swapper, "tiny-a").status_code == 200
        pid = _kill_backend(swapper, "tiny-a")
        response = chat(swapper, "tiny-a")
        answers.append(
            response.status_code
            if response.status_code == 200
            else (response.status_code, response.json()["error"]["message"])
        )
        wait_until(lambda pid=pid: process_state(pid) is None, 10, f"pid {pid} to be reaped")
    assert answers == [200] * ROUNDS
    assert swapper.model("tiny-a")["status"] == "LOADED"


def test_a_request_right_after_a_kill_mid_stream_is_served(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    assert chat(swapper, "tiny-a").status_code == 200
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 400, "stream": True}
    with (
        httpx.Client(base_url=swapper.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        _kill_backend(swapper, "tiny-a")
        after = chat(swapper, "tiny-a")
        tail = [line for line in lines if line.startswith("data: ")]
    assert after.status_code == 200, after.text
    # The stream that was cut off says so, in the OpenAI shape.
    errors = [json.loads(line[6:]) for line in tail if '"error"' in line]
    assert not errors or errors[-1]["error"]["type"] == "server_error"


def test_a_model_that_cannot_start_never_evicts_the_resident_one(swapper_factory: Any) -> None:
    workdir = swapper_factory.workdir
    missing_file = workdir / "missing.gguf"
    missing_binary = workdir / "no-such-dir" / "llama-server"
    entry = {"backend": "llamacpp", "ctx_size": 512}
    swapper = swapper_factory(
        models={
            "tiny-a": {**entry, "model_path": str(workdir / "tiny-a.gguf")},
            "no-file": {**entry, "model_path": str(missing_file)},
            "no-binary": {
                **entry,
                "model_path": str(workdir / "tiny-b.gguf"),
                "binary": str(missing_binary),
            },
        }
    )
    assert chat(swapper, "tiny-a").status_code == 200
    pid = swapper.model("tiny-a")["pid"]
    for model, path in [
        ("no-file", missing_file),
        ("no-binary", missing_binary),
        ("no-file", missing_file),
    ]:
        response = chat(swapper, model)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error" and str(path) in error["message"]
        assert swapper.model(model)["status"] == "FAILED"
        assert str(path) in swapper.model(model)["last_error"]
    assert swapper.model("tiny-a")["status"] == "LOADED"
    assert swapper.model("tiny-a")["pid"] == pid  # never unloaded, never restarted
    assert "Starting no-" not in swapper.output()
