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
        answers.append(response.status_code if response.status_code == 200
                       else (response.status_code, response.json()["error"]["message"]))
        wait_until(lambda: process_state(pid) is None, 10, f"pid {pid} to be reaped")
    assert answers == [200] * ROUNDS
    assert swapper.model("tiny-a")["status"] == "LOADED"


def test_a_request_right_after_a_kill_mid_stream_is_served(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    assert chat(swapper, "tiny-a").status_code == 200
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=swapper.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
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
