"""Clients that hang up while their model is still loading, over real HTTP.

A leaked place in the queue would count against ``max_queue`` for ever, and in the end every
client would get a 429. The backend is a real llama-server behind a gate the test opens, so the
model is LOADING for exactly as long as the test needs.
"""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MESSAGES, SwapperProcess, chat, tiny_model, wait_until

pytestmark = pytest.mark.integration


def gated_llama_server(tmp_path: Path, llama_server: str) -> tuple[Path, Path]:
    """A wrapper that starts the real llama-server only once ``gate`` exists; (wrapper, gate)."""
    gate = tmp_path / "gate"
    wrapper = tmp_path / "gated-llama-server"
    wrapper.write_text(
        f'#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.02; done\nexec {llama_server} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper, gate


def send_raw(swapper: SwapperProcess, body: dict[str, Any]) -> socket.socket:
    """A chat request on a raw socket, so the test can hang up at a moment of its choosing."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", swapper.port), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    return sock


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_a_client_that_hangs_up_during_loading_gives_its_queue_place_back(
    swapper_factory: Any,
    tmp_path: Path,
    llama_server: str,
    stream: bool,
) -> None:
    wrapper, gate = gated_llama_server(tmp_path, llama_server)
    swapper = swapper_factory(
        models={"tiny-a": tiny_model(swapper_factory.workdir, "a", binary=str(wrapper))},
        swapper={"max_queue": 1, "loading_feedback_interval": 0.2},
    )
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2, "stream": stream}
    sock = send_raw(swapper, body)
    try:
        wait_until(
            lambda: (m := swapper.model("tiny-a"))["status"] == "LOADING" and m["queued"] == 1,
            30,
            "the request to wait for the loading model",
        )
        if stream:
            # A waiting stream has its 200 and loading comments already: hang up mid-answer.
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
        # The queue is full (max_queue 1): a second client is refused while the first waits.
        assert chat(swapper, "tiny-a").status_code == 429
    finally:
        sock.close()
    wait_until(
        lambda: swapper.model("tiny-a")["queued"] == 0,
        30,
        "swapper to notice the hang-up and free the queue place",
    )
    gate.touch()
    # The place is free again: a new client queues instead of getting a 429, and is served.
    response = chat(swapper, "tiny-a")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    model = swapper.model("tiny-a")
    assert (model["status"], model["queued"], model["in_flight"]) == ("LOADED", 0, 0)
