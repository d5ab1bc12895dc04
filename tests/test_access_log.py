"""The access log: one line per request, in the service's log format, unless turned off."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import MESSAGES, SwapperProcess, tiny_model, wait_until

pytestmark = pytest.mark.integration


def _swapper(swapper_factory: Any, **server: Any) -> SwapperProcess:
    """swapper with one tiny model (ctx 512) and these ``server:`` settings."""
    models = {"tiny-a": tiny_model(swapper_factory.workdir, "a", ctx_size=512)}
    return swapper_factory(models=models, server=server)


def _requests(swapper: SwapperProcess) -> list[tuple[int, str, int]]:
    """Send a chat, a stream, /v1/models and a request for an unknown model."""
    sent = []
    chat = swapper.http.post(
        "/v1/chat/completions",
        headers={"X-Request-Id": "req-chat"},
        json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2},
    )
    sent.append((chat.status_code, "req-chat", len(chat.content)))
    with swapper.http.stream(
        "POST",
        "/v1/chat/completions",
        headers={"X-Request-Id": "req-sse"},
        json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2, "stream": True},
    ) as stream:
        streamed = stream.read()
    sent.append((stream.status_code, "req-sse", len(streamed)))
    models = swapper.http.get("/v1/models", headers={"X-Request-Id": "req-models"})
    sent.append((models.status_code, "req-models", len(models.content)))
    missing = swapper.http.post(
        "/v1/chat/completions",
        headers={"X-Request-Id": "req-404"},
        json={"model": "nope", "messages": MESSAGES},
    )
    sent.append((missing.status_code, "req-404", len(missing.content)))
    assert [status for status, _, _ in sent] == [200, 200, 200, 404]
    return sent


def test_access_log_text(swapper_factory: Any) -> None:
    swapper = _swapper(swapper_factory)
    sent = _requests(swapper)
    wait_until(lambda: "id=req-404" in swapper.output(), 10, "the last access line")
    lines = [line for line in swapper.output().splitlines() if "swapper.access:" in line]
    pattern = re.compile(
        r"swapper\.access: (\S+) (\S+) (\S+) model=(\S+) "
        r"([0-9.]+)s (\d+)B id=(\S+)$"
    )
    parsed = {m[7]: m for m in map(pattern.search, lines) if m}
    assert len(lines) == len(parsed)  # every access line has the documented shape
    expected = {
        "req-chat": ("POST", "/v1/chat/completions", "tiny-a"),
        "req-sse": ("POST", "/v1/chat/completions", "tiny-a"),
        "req-models": ("GET", "/v1/models", "-"),
        "req-404": ("POST", "/v1/chat/completions", "-"),
    }
    for status, request_id, size in sent:
        line = parsed[request_id]
        assert (line[1], line[2], line[4]) == expected[request_id]
        assert (int(line[3]), int(line[6])) == (status, size)
        assert float(line[5]) >= 0
    assert sum(1 for line in lines if "id=req-chat" in line) == 1  # one line per request


def test_access_log_json(swapper_factory: Any) -> None:
    swapper = _swapper(swapper_factory, log_format="json")
    sent = _requests(swapper)
    wait_until(lambda: "req-404" in swapper.output(), 10, "the last access line")
    records = [json.loads(line) for line in swapper.output().splitlines() if line.startswith("{")]
    access = {r["request_id"]: r for r in records if r["logger"] == "swapper.access"}
    for status, request_id, size in sent:
        record = access[request_id]
        assert record["status"] == status and record["bytes"] == size
        assert record["method"] in ("GET", "POST") and record["path"].startswith("/v1/")
        assert record["duration_s"] >= 0
    assert access["req-chat"]["model"] == "tiny-a"
    assert access["req-sse"]["model"] == "tiny-a"
    assert access["req-models"]["model"] is None


def test_access_log_can_be_turned_off(swapper_factory: Any) -> None:
    swapper = _swapper(swapper_factory, access_log=False)
    _requests(swapper)
    wait_until(lambda: "loaded in" in swapper.output(), 10, "the load to be logged")
    assert "swapper.access" not in swapper.output()
    metrics = swapper.http.get("/metrics").text  # still counted
    assert 'swapper_requests_total{endpoint="/v1/models",model="",status="200"} 1.0' in metrics
