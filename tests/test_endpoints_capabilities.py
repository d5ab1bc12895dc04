"""Backend capabilities: an endpoint a model's backend does not serve is a 404 naming both,
refused before anything loads or is evicted. In-process, on fake backends (whose kind serves
the default set: chat, completions, embeddings)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import respx

from swapper.backends.contract import Backend
from swapper.errors import ConfigError
from swapper.http.exchange import Exchange, Forward
from swapper.http.rename import ModelRename, Shaping
from swapper.scheduling.coordinator import SwapCoordinator
from tests.conftest import MESSAGES, CoordinatorFactory, FakeApp, fake_config
from tests.fakes import FakeWorld
from tests.test_exchange import BODY, FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/responses", "/v1/responses"),
        ("/rerank", "/v1/rerank"),
        ("/tokenize", "/tokenize"),
    ],
)
async def test_an_endpoint_the_backend_lacks_is_404_with_no_load_and_no_eviction(
    fake_app: FakeApp, world: FakeWorld, path: str, endpoint: str
) -> None:
    async with fake_app({"a": {"aliases": ["alpha"]}, "b": {}}) as client:
        served = await client.post(
            "/v1/chat/completions", json={"model": "b", "messages": MESSAGES}
        )
        assert served.status_code == 200
        assert world.starts("b") == 1

        refused = await client.post(path, json={"model": "alpha", "input": "hi"})
        assert refused.status_code == 404
        error = refused.json()["error"]
        assert error["code"] == "endpoint_not_supported"
        assert "'a'" in error["message"] and endpoint in error["message"]
        assert world.starts("a") == 0
        models = (await client.get("/status")).json()["models"]
        assert models["a"]["status"] == "UNLOADED" and models["a"]["pid"] is None
        assert models["b"]["status"] == "LOADED"  # the resident model was not evicted for it
        assert world.events.count(("stop", "b")) == 0


async def test_anthropic_paths_refuse_in_anthropics_shape(
    fake_app: FakeApp, world: FakeWorld
) -> None:
    async with fake_app({"a": {}}) as client:
        body = {"model": "a", "max_tokens": 1, "messages": MESSAGES}
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            refused = await client.post(path, json=body)
            assert refused.status_code == 404
            assert refused.json()["type"] == "error"
            assert refused.json()["error"]["type"] == "not_found_error"
            assert path in refused.json()["error"]["message"]
    assert world.starts("a") == 0


def test_the_default_capabilities_are_the_openai_basics() -> None:
    assert Backend.endpoints == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


# -- the one rewrite step: rename and shaping ------------------------------------------------


def test_shaping_strips_then_sets_and_leaves_other_keys() -> None:
    rewrite = ModelRename("m", None, Shaping(("top_k", "max_tokens"), {"max_tokens": 5, "seed": 1}))
    body = b'{"model":"alias","top_k":3,"max_tokens":9,"seed":7,"x":[1]}'
    assert rewrite.request(body, "alias") == (b'{"model":"alias","seed":7,"x":[1],"max_tokens":5}')
    assert rewrite.responses is False  # no backend name: responses pass untouched


def test_without_shaping_or_a_backend_name_the_body_is_the_same_object() -> None:
    body = b'{"model":"qwen3:8b","top_k":3}'
    assert ModelRename("qwen", "qwen3:8b").request(body, "qwen3:8b") is body


def test_nested_model_names_in_anthropic_and_responses_events_are_renamed() -> None:
    rename = ModelRename("qwen", "qwen3:8b")
    start = b'{"type":"message_start","message":{"id":"x","model":"qwen3:8b"}}'
    assert rename.response(start) == b'{"type":"message_start","message":{"id":"x","model":"qwen"}}'
    created = b'{"type":"response.created","response":{"model":"qwen3:8b"}}'
    assert rename.response(created) == b'{"type":"response.created","response":{"model":"qwen"}}'


# -- Anthropic headers and errors, against a respx upstream --------------------------------------


async def test_anthropic_headers_pass_through_and_backend_errors_take_anthropics_shape(
    fake_app: FakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake kind serves /v1/messages for this test only.
    monkeypatch.setattr(Backend, "endpoints", Backend.endpoints | {"/v1/messages"})
    async with fake_app({"a": {}}, reply=None) as client:
        with respx.mock(assert_all_called=True) as upstream:
            route = upstream.post("http://a.fake.test/v1/messages")
            route.side_effect = [
                httpx.Response(200, json={"type": "message", "model": "a", "content": []}),
                httpx.Response(
                    503,
                    json={"error": {"code": 503, "message": "busy", "type": "unavailable_error"}},
                ),
            ]
            headers = {
                "anthropic-version": "2023-06-01",
                "anthropic-beta": "tools-1",
                "x-other": "1",
            }
            body = {"model": "a", "max_tokens": 1, "messages": MESSAGES}
            answer = await client.post("/v1/messages", json=body, headers=headers)
            assert answer.status_code == 200 and answer.json()["type"] == "message"
            sent = route.calls[0].request.headers
            assert sent["anthropic-version"] == "2023-06-01"
            assert sent["anthropic-beta"] == "tools-1"
            assert "x-other" not in sent  # only Anthropic's own headers are passed on

            busy = await client.post("/v1/messages", json=body, headers=headers)
            assert busy.status_code == 503
            assert busy.json() == {
                "type": "error",
                "error": {"type": "api_error", "message": "busy"},
            }


def exchange_state(coordinator: SwapCoordinator, upstream: FakeUpstream) -> Any:
    """What an Exchange reads of the app's state, for a model already resident."""
    histogram = SimpleNamespace(observe=lambda seconds: None)
    return SimpleNamespace(
        coordinator=coordinator,
        upstream=upstream,
        metrics=SimpleNamespace(ttfb=SimpleNamespace(labels=lambda model: histogram)),
        stopping=asyncio.Event(),
        catalog=SimpleNamespace(shaping={}),
    )


async def test_a_broken_anthropic_stream_ends_with_anthropics_error_event(
    coordinator_factory: CoordinatorFactory,
) -> None:
    coordinator = coordinator_factory()
    await coordinator.load("a")
    upstream = FakeUpstream(FakeResponse(broken=True))
    forward = Forward("/v1/messages", BODY, "a", "a", True, "anthropic")
    exchange = Exchange(exchange_state(coordinator, upstream), {"type": "http"}, forward)
    await exchange.open()
    chunks = [chunk async for chunk in exchange.relay()]
    event, _, data = chunks[-1].partition(b"\n")
    assert event == b"event: error"
    assert json.loads(data.removeprefix(b"data: ")) == {
        "type": "error",
        "error": {"type": "api_error", "message": "Backend for 'a' broke the connection: reset"},
    }


@pytest.mark.parametrize("shaping", [{"strip_params": ["model"]}, {"set_params": {"model": "x"}}])
def test_shaping_may_not_touch_the_model_name(world: FakeWorld, shaping: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as refused:
        fake_config(world, {"a": shaping})
    assert refused.value.message == (
        "test.yaml: $.models.a: strip_params and set_params must not name 'model' "
        "(swapper routes by it; use aliases or the backend's upstream name)"
    )
