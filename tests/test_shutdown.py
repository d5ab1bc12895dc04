"""Stopping swapper while a model loads: everyone waiting hears "shutting down" at once."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MESSAGES, processes_with, wait_until

pytestmark = pytest.mark.integration

#: Far beyond what the answers may take: they must not wait for the grace period to end.
GRACE = 40


def _slow_binary(tmp_path: Path, llama_server: str) -> Path:
    wrapper = tmp_path / "slow-llama-server"
    # A model that takes minutes to load: llama-server starts only after a long pause.
    wrapper.write_text(f'#!/bin/sh\nsleep 600\nexec {llama_server} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def test_stop_during_a_load_answers_every_waiter(
    swapper_factory: Any, tmp_path: Path, llama_server: str
) -> None:
    wrapper = _slow_binary(tmp_path, llama_server)
    workdir = swapper_factory.workdir
    swapper = swapper_factory(
        swapper={
            "shutdown_timeout": GRACE,
            "model_swap_timeout": GRACE,
            "loading_feedback": "comments",
            "loading_feedback_interval": 0.2,
        },
        models={
            "tiny-a": {
                "backend": "llamacpp",
                "binary": str(wrapper),
                "ctx_size": 512,
                "model_path": str(workdir / "tiny-a.gguf"),
            }
        },
    )
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2}
    stream_seen = concurrent.futures.Future[None]()

    def plain() -> httpx.Response:
        with httpx.Client(base_url=swapper.url, timeout=GRACE) as client:
            return client.post("/v1/chat/completions", json=body)

    def streamed() -> tuple[int, list[str]]:
        with (
            httpx.Client(base_url=swapper.url, timeout=GRACE) as client,
            client.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as response,
        ):
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith(": loading") and not stream_seen.done():
                    stream_seen.set_result(None)
            return response.status_code, lines

    def admin_load() -> httpx.Response:
        with httpx.Client(base_url=swapper.url, timeout=GRACE) as client:
            return client.post("/models/tiny-a/load")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(plain), pool.submit(streamed), pool.submit(admin_load)]
        wait_until(lambda: swapper.model("tiny-a")["queued"] == 3, 30, "three waiters")
        stream_seen.result(timeout=30)
        assert swapper.model("tiny-a")["status"] == "LOADING"
        stopped_at = time.monotonic()
        swapper.signal(signal.SIGTERM)
        plain_answer, (stream_status, stream_lines), load_answer = (
            answer.result(timeout=GRACE) for answer in answers
        )
    answered_in = time.monotonic() - stopped_at
    for response in (plain_answer, load_answer):
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert error["code"] == "service_unavailable" and "shutting down" in error["message"]
    assert stream_status == 200
    events = [json.loads(line[6:]) for line in stream_lines if line.startswith("data: ")]
    assert events and "shutting down" in events[-1]["error"]["message"]
    swapper.proc.wait(timeout=GRACE)
    # Well inside the grace period: nobody waited for it to run out.
    assert answered_in < GRACE / 2
    assert "Exception in ASGI application" not in swapper.output()
    assert processes_with(str(wrapper)) == []
