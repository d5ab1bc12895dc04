"""Access control, CORS and bad input at the HTTP layer, with fake backends behind respx."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from tests.conftest import FakeApp
from tests.fakes import FakeWorld

pytestmark = pytest.mark.anyio

CHAT = {"model": "a", "messages": [{"role": "user", "content": "a secret prompt"}]}
#: The fake backend's answer: its content must reach the client and never the log.
REPLY = {
    "id": "r1",
    "object": "chat.completion",
    "created": 1,
    "model": "a",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "a secret answer"},
            "finish_reason": "stop",
        }
    ],
}
PLAIN, ADMIN = "plain-key-123", "admin-key-456"

ClientFactory = Callable[..., contextlib.AbstractAsyncContextManager[AsyncTestClient[Any]]]


@pytest.fixture
def make_client(fake_app: FakeApp) -> ClientFactory:
    """conftest's fake_app with two models, a and b, whose backends answer :data:`REPLY`."""
    return functools.partial(fake_app, {"a": {}, "b": {}}, reply=REPLY)


def answer_of(response: httpx.Response) -> str:
    """The assistant's content in a 200 chat reply, which must be the fake backend's."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "a"
    return body["choices"][0]["message"]["content"]  # type: ignore[no-any-return]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error  # type: ignore[no-any-return]


async def test_without_keys_everything_is_open(make_client: ClientFactory) -> None:
    async with make_client() as client:
        assert answer_of(await client.post("/v1/chat/completions", json=CHAT)) == "a secret answer"
        unloaded = await client.post("/models/a/unload")
        assert unloaded.status_code == 200 and unloaded.json()["status"] == "UNLOADED"


async def test_keys_as_bearer_or_x_api_key(make_client: ClientFactory) -> None:
    async with make_client(server={"api_keys": [PLAIN], "admin_api_keys": [ADMIN]}) as client:
        assert (
            error_of(await client.post("/v1/chat/completions", json=CHAT), 401)["code"]
            == "invalid_api_key"
        )
        assert (await client.post("/v1/chat/completions", json=CHAT)).headers["www-authenticate"]
        wrong = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}
        )
        error_of(wrong, 401)
        wrong = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "nope"})
        error_of(wrong, 401)
        for headers in (
            {"Authorization": f"Bearer {PLAIN}"},
            {"x-api-key": PLAIN},
            {"Authorization": f"Bearer {ADMIN}"},
        ):
            ok = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert answer_of(ok) == "a secret answer", headers
        listed = await client.get("/v1/models", headers={"x-api-key": PLAIN})
        assert [model["id"] for model in listed.json()["data"]] == ["a", "b"]
        error_of(await client.get("/v1/models"), 401)
        error_of(await client.get("/status"), 401)
        assert (await client.get("/health")).json() == {"status": "ok"}  # always open


async def test_plain_keys_cannot_use_admin_endpoints(make_client: ClientFactory) -> None:
    async with make_client(server={"api_keys": [PLAIN], "admin_api_keys": [ADMIN]}) as client:
        plain = {"Authorization": f"Bearer {PLAIN}"}
        for path in ("/models/a/load", "/models/a/unload", "/admin/reload"):
            assert (
                error_of(await client.post(path, headers=plain), 403)["code"]
                == "insufficient_scope"
            )
            error_of(await client.post(path), 401)
        loaded = await client.post("/models/a/load", headers={"x-api-key": ADMIN})
        assert loaded.json()["status"] == "LOADED"


async def test_admin_endpoints_are_closed_when_only_plain_keys_exist(
    make_client: ClientFactory,
) -> None:
    async with make_client(server={"api_keys": [PLAIN]}) as client:
        error_of(await client.post("/models/a/load", headers={"x-api-key": PLAIN}), 403)


async def test_keys_come_from_the_environment_and_never_show(
    make_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SWAPPER_TEST_KEY", "env-key-789")
    caplog.set_level(logging.DEBUG)
    async with make_client(server={"api_keys": ["${env:SWAPPER_TEST_KEY}"]}) as client:
        headers = {"Authorization": "Bearer env-key-789"}
        reply = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert answer_of(reply) == "a secret answer"
        error_of(await client.post("/v1/chat/completions", json=CHAT), 401)  # the key is needed
        status = await client.get("/status", headers=headers)
        assert status.json()["models"]["a"]["status"] == "LOADED"
        assert "env-key-789" not in status.text
    assert caplog.text  # something was logged, so the checks below look at real lines
    assert "env-key-789" not in caplog.text
    assert "a secret prompt" not in caplog.text  # prompts are not logged
    assert "a secret answer" not in caplog.text  # nor completions


async def test_cors_is_off_by_default_and_on_for_listed_origins(make_client: ClientFactory) -> None:
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    async with make_client() as client:
        response = await client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        assert error_of(response, 403)["code"] == "origin_not_allowed"  # a foreign page's call
    async with make_client(server={"cors_origins": ["http://ui.example"]}) as client:
        response = await client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 204, response.text
        assert response.headers["access-control-allow-origin"] == "http://ui.example"
        other = await client.options(
            "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}
        )
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"
        assert error_of(other, 403)["code"] == "origin_not_allowed"


@pytest.mark.parametrize(
    ("content", "headers", "status", "fragment"),
    [
        (b"{bad", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b'{"model": ["a"]}', {"content-type": "application/json"}, 400, "must be a string"),
        (
            b'{"model": "a", "messages": "\xff\xfe"}',
            {"content-type": "application/json"},
            400,
            "not valid UTF-8",
        ),
        (b'{"model": "\xc3"}', {"content-type": "application/json"}, 400, "not valid UTF-8"),
        (b'{"model": "a"}', {"content-type": "text/plain"}, 415, "must be application/json"),
        (
            b'{"model": "a"}',
            {"content-type": "multipart/form-data; boundary=x"},
            415,
            "must be application/json",
        ),
        (
            b'{"model": "a", "pad": "' + b"x" * 2048 + b'"}',
            {"content-type": "application/json"},
            413,
            "",
        ),
        (b"", {"content-type": "application/json"}, 400, "not valid JSON"),
    ],
)
async def test_bad_input_is_a_4xx_openai_error(
    make_client: ClientFactory,
    world: FakeWorld,
    content: bytes,
    headers: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    async with make_client(server={"max_request_bytes": 1024}) as client:
        response = await client.post("/v1/chat/completions", content=content, headers=headers)
        assert fragment in error_of(response, status)["message"]
    assert world.events == []  # nothing was loaded for a bad request


async def test_json_without_content_type_is_accepted(make_client: ClientFactory) -> None:
    async with make_client() as client:
        response = await client.post("/v1/chat/completions", content=b'{"model": "a"}')
        assert answer_of(response) == "a secret answer"


async def test_queue_cap_answers_429_with_retry_after(
    make_client: ClientFactory,
    world: FakeWorld,
) -> None:
    # max_queue 0: a request that would have to wait for a load is refused at once.
    async with make_client(swapper={"max_queue": 0}) as client:
        # A stream that would wait is refused too, before any 200 or loading feedback.
        for body in (CHAT, {**CHAT, "stream": True}):
            refused = await client.post("/v1/chat/completions", json=body)
            assert error_of(refused, 429)["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
    assert world.events == []
