"""HTTP handlers against fake backends, with respx standing in for the upstream HTTP edge."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from tests.conftest import MESSAGES, FakeApp
from tests.fakes import Behaviour, FakeWorld

pytestmark = pytest.mark.anyio

CHAT = {"model": "a", "messages": MESSAGES, "max_tokens": 4}
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "a",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@pytest.fixture
async def client(fake_app: FakeApp) -> AsyncIterator[AsyncTestClient[Any]]:
    """Models a (alias alpha) and b; the upstream is each test's own respx router."""
    async with fake_app({"a": {"aliases": ["alpha"]}, "b": {}}, reply=None) as test_client:
        yield test_client


@pytest.fixture
def upstream() -> respx.MockRouter:
    # respx patches httpcore, the transport swapper forwards with; the test client is untouched.
    with respx.mock(assert_all_called=False) as router:
        yield router


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


async def test_models_lists_every_model_without_loading(
    client: AsyncTestClient[Any], world: FakeWorld
) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a", "b"]
    for model in body["data"]:
        assert model["object"] == "model" and isinstance(model["created"], int)
        assert isinstance(model["owned_by"], str)
    assert world.events == []


async def test_chat_is_forwarded_unchanged_and_answered(
    client: AsyncTestClient[Any], upstream: respx.MockRouter
) -> None:
    route = upstream.post("http://a.fake.test/v1/chat/completions").respond(json=COMPLETION)
    body = {**CHAT, "model": "alpha", "custom_field": {"x": [1, 2]}}
    raw = json.dumps(body).encode()
    response = await client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == COMPLETION
    assert route.calls.last.request.content == raw  # byte for byte, alias and unknown fields kept
    status = (await client.get("/status")).json()
    assert status["active_model"] == "a"
    assert status["models"]["a"]["status"] == "LOADED"
    assert status["models"]["a"]["in_flight"] == 0


async def test_completions_and_embeddings_are_routed(
    client: AsyncTestClient[Any], upstream: respx.MockRouter
) -> None:
    upstream.post("http://b.fake.test/v1/completions").respond(json={"object": "text_completion"})
    upstream.post("http://b.fake.test/v1/embeddings").respond(json={"object": "list", "data": []})
    r1 = await client.post("/v1/completions", json={"model": "b", "prompt": "x"})
    r2 = await client.post(
        "/v1/embeddings", json={"model": "b", "input": ["x"], "encoding_format": "base64"}
    )
    assert r1.json() == {"object": "text_completion"}
    assert r2.json() == {"object": "list", "data": []}
    assert json.loads(upstream.calls.last.request.content)["encoding_format"] == "base64"


async def test_stream_is_relayed_as_sse(
    client: AsyncTestClient[Any], upstream: respx.MockRouter
) -> None:
    events = b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n: ping\n\ndata: [DONE]\n\n'
    upstream.post("http://a.fake.test/v1/chat/completions").respond(
        200, content=events, headers={"content-type": "text/event-stream"}
    )
    async with client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        received = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert received == events
    assert (await client.get("/status")).json()["models"]["a"]["in_flight"] == 0


async def test_backend_breaking_before_the_headers_is_502(
    client: AsyncTestClient[Any], upstream: respx.MockRouter
) -> None:
    import httpcore

    upstream.post("http://a.fake.test/v1/chat/completions").mock(
        side_effect=httpcore.RemoteProtocolError("peer closed connection")
    )
    assert (await client.post("/models/a/load")).status_code == 200  # resident: no feedback
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    error = assert_openai_error(response, 502, "backend_error")
    assert "broke the connection" in error["message"]


@pytest.mark.parametrize(
    ("upstream_status", "upstream_body", "message"),
    [
        (
            400,
            {"error": {"code": 400, "message": "bad n_predict", "type": "invalid_request_error"}},
            "bad n_predict",
        ),
        (
            400,
            {"object": "error", "message": "flat vllm error", "type": "BadRequestError"},
            "flat vllm error",
        ),
        (500, "plain text failure", "plain text failure"),
    ],
)
async def test_upstream_errors_are_normalised(
    client: AsyncTestClient[Any],
    upstream: respx.MockRouter,
    upstream_status: int,
    upstream_body: Any,
    message: str,
) -> None:
    route = upstream.post("http://a.fake.test/v1/chat/completions")
    if isinstance(upstream_body, str):
        route.respond(upstream_status, text=upstream_body)
    else:
        route.respond(upstream_status, json=upstream_body)
    response = await client.post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, upstream_status)
    assert error["message"] == message


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"messages": []}', 400, "model parameter"),
        (b'{"model": 7}', 400, "must be a string"),
        (b'{"model": ""}', 400, "must not be empty"),
        (b'{"model": "nope"}', 404, "does not exist"),
    ],
)
async def test_bad_requests_get_openai_errors(
    client: AsyncTestClient[Any], world: FakeWorld, body: bytes, status: int, fragment: str
) -> None:
    response = await client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, status)
    assert fragment in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    assert world.events == []


async def test_unknown_route_and_method_are_openai_errors(client: AsyncTestClient[Any]) -> None:
    assert_openai_error(await client.get("/v1/nothing"), 404, "not_found")
    assert_openai_error(await client.get("/v1/chat/completions"), 405)


async def test_failed_load_is_503_with_retry_after(
    client: AsyncTestClient[Any], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.FAIL_START)
    response = await client.post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 503, "model_unavailable")
    assert "fake start failed" in error["message"]
    assert int(response.headers["retry-after"]) > 0
    status = (await client.get("/status")).json()["models"]["a"]
    assert status["status"] == "FAILED" and "fake start failed" in status["last_error"]


async def test_dead_backend_is_502(
    client: AsyncTestClient[Any], upstream: respx.MockRouter
) -> None:
    import httpcore

    upstream.post("http://a.fake.test/v1/chat/completions").mock(
        side_effect=httpcore.ConnectError("connection refused")
    )
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(response, 502, "backend_error")


async def test_admin_load_unload_and_status(client: AsyncTestClient[Any], world: FakeWorld) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    loaded = await client.post("/models/b/load")
    assert loaded.status_code == 200
    assert loaded.json()["status"] == "LOADED"
    status = (await client.get("/status")).json()
    assert status["mode"] == "single-active" and status["active_model"] == "b"
    assert set(status["models"]["b"]) >= {
        "status",
        "backend",
        "pid",
        "port",
        "loaded_at",
        "last_error",
    }
    assert status["models"]["b"]["pid"] is not None
    unloaded = await client.post("/models/b/unload")
    assert unloaded.json()["status"] == "UNLOADED"
    assert world.alive == set()
    assert_openai_error(await client.post("/models/zzz/load"), 404, "model_not_found")


async def test_stream_waiting_for_a_failed_load_ends_with_an_error_event(
    client: AsyncTestClient[Any], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.FAIL_START)
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    # The stream had to wait for a load, so its 200 and SSE headers went out at once.
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
    error = json.loads(events[-1][len("data: ") :])["error"]
    assert error["code"] == "model_unavailable" and "fake start failed" in error["message"]
