"""``/api/*`` at the HTTP edge, in-process on fake backends: keys, errors in Ollama's shape,
and the OpenAI body that reaches the backend."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import respx

from tests.conftest import REPLY, FakeApp

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def assert_ollama_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return str(body["error"])


async def test_same_keys_as_v1_and_refusals_in_ollamas_shape(fake_app: FakeApp) -> None:
    async with fake_app(server={"api_keys": ["k1"]}) as client:
        assert "Missing API key" in assert_ollama_error(await client.get("/api/tags"), 401)
        wrong = await client.get("/api/tags", headers={"Authorization": "Bearer nope"})
        assert assert_ollama_error(wrong, 401) == "Invalid API key"
        tags = await client.get("/api/tags", headers={"Authorization": "Bearer k1"})
        assert tags.status_code == 200
        assert [m["name"] for m in tags.json()["models"]] == ["a:latest", "b:latest", "c:latest"]


async def test_the_backend_gets_an_openai_body(
    fake_app: FakeApp, upstream: respx.MockRouter
) -> None:
    route = upstream.post("http://a.fake.test/v1/chat/completions").respond(json=REPLY)
    async with fake_app(reply=None) as client:
        response = await client.post(
            "/api/chat",
            json={
                "model": "alpha:latest",
                "messages": HI,
                "stream": False,
                "options": {"num_predict": 3, "temperature": 0, "num_gpu": 99, "tfs_z": 1},
                "format": "json",
            },
        )
    assert response.status_code == 200
    answer = response.json()
    assert answer["model"] == "alpha:latest"  # the name the client used
    assert answer["message"] == {"role": "assistant", "content": "ok"}
    assert answer["done"] is True and answer["done_reason"] == "stop"
    assert (answer["prompt_eval_count"], answer["eval_count"]) == (1, 1)
    sent = json.loads(route.calls.last.request.content)
    assert sent == {
        "model": "a",
        "stream": False,
        "max_tokens": 3,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "messages": HI,
    }


async def test_backend_errors_and_odd_answers_come_back_in_ollamas_shape(
    fake_app: FakeApp, upstream: respx.MockRouter
) -> None:
    error = {
        "error": {"code": 400, "message": "the prompt is too long", "type": "invalid_request_error"}
    }
    upstream.post("http://a.fake.test/v1/chat/completions").respond(400, json=error)
    upstream.post("http://b.fake.test/v1/chat/completions").respond(json={"not": "openai"})
    async with fake_app(reply=None) as client:
        refused = await client.post(
            "/api/chat", json={"model": "a", "messages": HI, "stream": False}
        )
        assert assert_ollama_error(refused, 400) == "the prompt is too long"
        odd = await client.post("/api/chat", json={"model": "b", "messages": HI, "stream": False})
        assert "unexpected shape" in assert_ollama_error(odd, 502)
        for body in (b"[1]", b"{", json.dumps({"messages": HI}).encode()):
            assert_ollama_error(await client.post("/api/chat", content=body), 400)
        bad_options = {"model": "a", "messages": HI, "options": [1]}
        assert "options" in assert_ollama_error(
            await client.post("/api/chat", json=bad_options), 400
        )
        bad_keep = {"model": "a", "messages": HI, "keep_alive": "soon"}
        assert "keep_alive" in assert_ollama_error(
            await client.post("/api/chat", json=bad_keep), 400
        )
        assert_ollama_error(await client.post("/api/show", json={"model": "zzz"}), 404)
        assert_ollama_error(await client.request("DELETE", "/api/delete", json={"model": "a"}), 501)
        assert_ollama_error(await client.post("/api/copy", json={}), 501)
        assert_ollama_error(await client.get("/api/unknown"), 404)
