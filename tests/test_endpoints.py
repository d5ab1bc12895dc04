"""The endpoints beyond chat, end to end: a real ``swapper serve`` in front of real
llama-server backends, driven by the official OpenAI SDK and plain HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import MESSAGES, chat, processes_with, sdk, tiny_model
from tests.test_ollama import OLLAMA, PULLED
from tests.test_operations import slow_llama_server

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}


def test_responses_api_streamed_while_loading_and_plain(
    swapper_factory: Any, tmp_path: Path, llama_server: str
) -> None:
    # A backend that takes 0.6 s to start, and loading comments every 0.1 s meanwhile.
    slow = slow_llama_server(tmp_path, llama_server, 0.6)
    workdir = swapper_factory.workdir
    models = {
        "tiny-a": tiny_model(workdir, binary=slow, aliases=["a"]),
        "tiny-b": tiny_model(workdir, "b", aliases=["b"]),
    }
    swapper = swapper_factory(models=models, swapper={"loading_feedback_interval": 0.1})
    client = sdk(swapper)
    with swapper.http.stream(
        "POST",
        "/v1/responses",
        json={"model": "a", "input": "hi", "max_output_tokens": 3, "stream": True},
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = list(raw.iter_lines())
    comments = [line for line in lines if line.startswith(": loading tiny-a ")]
    assert len(comments) >= 2, lines[:5]  # swapper's comments, then the backend's events
    assert "event: response.completed" in lines
    swapper.http.post("/models/tiny-a/unload")
    loading = client.responses.create(model="a", input="hi", max_output_tokens=2, stream=True)
    assert [e.type for e in loading][-1] == "response.completed"  # the SDK skips the comments

    events = list(
        client.responses.create(model="tiny-b", input="hi", max_output_tokens=3, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 3
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "".join(deltas)

    response = client.responses.create(model="b", input="hi", max_output_tokens=4)
    assert response.object == "response" and response.status == "completed"
    assert response.model == "tiny-b"
    assert isinstance(response.output_text, str) and response.output_text
    assert response.usage is not None and response.usage.output_tokens == 4


def test_models_retrieve_by_id_and_alias_with_status_and_context(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    client = sdk(swapper)
    model = client.models.retrieve("tiny-b")
    assert model.id == "tiny-b" and model.object == "model"
    extra = model.model_dump()
    assert extra["status"] == "UNLOADED" and extra["aliases"] == ["b"]
    assert extra["context_length"] == 512  # the entry's ctx_size
    assert swapper.model("tiny-b")["status"] == "UNLOADED"  # asking never loads

    by_alias = client.models.retrieve("b").model_dump()
    assert by_alias["id"] == "b" and by_alias["alias_of"] == "tiny-b"

    listed = {m.id: m.model_dump() for m in client.models.list()}
    assert set(listed) == {"tiny-a", "tiny-b", "tiny-c"}  # aliases not listed by default
    assert listed["tiny-a"]["status"] == "UNLOADED"

    client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=1)
    assert client.models.retrieve("tiny-b").model_dump()["status"] == "LOADED"
    assert {m.id: m.model_dump()["status"] for m in client.models.list()}["tiny-b"] == "LOADED"

    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"


def test_llamacpp_own_endpoints_are_routed_by_model(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    tokens = swapper.http.post("/tokenize", json={"model": "a", "content": "hello"})
    assert tokens.status_code == 200
    # The bytes are the backend's own, unchanged.
    direct = httpx.post(
        f"http://127.0.0.1:{swapper.model('tiny-a')['port']}/tokenize",
        json={"model": "a", "content": "hello"},
    )
    assert tokens.content == direct.content
    assert tokens.headers["content-type"] == direct.headers["content-type"]
    ids = tokens.json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    text = swapper.http.post("/detokenize", json={"model": "tiny-a", "tokens": ids})
    assert text.status_code == 200 and text.json()["content"].strip() == "hello"
    template = swapper.http.post("/apply-template", json={"model": "a", "messages": MESSAGES})
    assert template.status_code == 200 and "hi" in template.json()["prompt"]
    completion = swapper.http.post(
        "/completion", json={"model": "a", "prompt": "x", "n_predict": 2}
    )
    assert completion.status_code == 200 and completion.json()["tokens_predicted"] == 2
    # A generated model has no fill-in-the-middle tokens: llama-server's 501, as an OpenAI error.
    infill = swapper.http.post(
        "/infill", json={"model": "a", "input_prefix": "a", "input_suffix": "b"}
    )
    assert infill.status_code == 501
    assert "Infill is not supported" in infill.json()["error"]["message"]
    assert swapper.model("tiny-a")["status"] == "LOADED"


def test_rerank_on_every_path_through_llama_server_with_reranking(swapper_factory: Any) -> None:
    workdir = swapper_factory.workdir
    swapper = swapper_factory(models={"ranker": tiny_model(workdir, args=["--reranking"])})
    documents = ["one two", "three", "four five six"]
    for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
        reply = swapper.http.post(
            path, json={"model": "ranker", "query": "one", "documents": documents}
        )
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        assert all(isinstance(r["relevance_score"], float) for r in results)


def test_upstream_passthrough_loads_first_and_writes_need_admin(swapper_factory: Any) -> None:
    swapper = swapper_factory(server={"api_keys": ["user"], "admin_api_keys": ["admin"]})
    user = {"Authorization": "Bearer user"}
    admin = {"Authorization": "Bearer admin"}
    swapper.http.headers.update(admin)  # for /status
    assert swapper.model("tiny-a")["status"] == "UNLOADED"

    props = swapper.http.get("/upstream/a/props", headers=user)
    assert props.status_code == 200
    assert props.json()["default_generation_settings"]["n_ctx"] == 512  # llama-server's own
    assert swapper.model("tiny-a")["status"] == "LOADED"
    slots = swapper.http.get(
        "/upstream/tiny-a/slots", params={"fail_on_no_slot": "0"}, headers=user
    )
    assert slots.status_code == 200 and isinstance(slots.json(), list)
    # The backend's own answers pass as they are, errors included (not rewritten).
    missing = swapper.http.get("/upstream/tiny-a/no-such-path", headers=user)
    assert missing.status_code == 404

    assert swapper.http.get("/upstream/a/props").status_code == 200
    assert (
        swapper.http.get("/upstream/a/props", headers={"Authorization": "Bearer x"}).status_code
        == 401
    )
    body = {"content": "hi"}
    refused = swapper.http.post("/upstream/a/tokenize", json=body, headers=user)
    assert refused.status_code == 403
    tokens = swapper.http.post("/upstream/a/tokenize", json=body, headers=admin)
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    unknown = swapper.http.get("/upstream/nope/props", headers=user)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_strip_and_set_params_shape_what_the_backend_sees(swapper_factory: Any) -> None:
    workdir = swapper_factory.workdir
    models = {
        # The tiny model never stops on its own: the tokens it generates are the max_tokens
        # the backend received.
        "shaped": tiny_model(
            workdir, strip_params=["max_tokens"], set_params={"max_tokens": 3}, aliases=["s"]
        ),
        "defaults": tiny_model(workdir, "b", set_params={"max_tokens": 2}),
    }
    swapper = swapper_factory(models=models)
    client = sdk(swapper)

    def generated(model: str, **extra: Any) -> int:
        reply = client.chat.completions.create(model=model, messages=MESSAGES, **extra)
        assert reply.usage is not None
        return reply.usage.completion_tokens

    assert generated("shaped", max_tokens=1) == 3  # the client's stripped, then set
    assert generated("s") == 3
    assert generated("defaults") == 2  # set where the client sent none
    assert generated("defaults", max_tokens=1) == 1  # and left alone where it did
    # A stream is shaped too.
    chunks = list(
        client.chat.completions.create(
            model="shaped",
            messages=MESSAGES,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_unlisted_models_are_routable_and_aliases_can_be_listed(swapper_factory: Any) -> None:
    workdir = swapper_factory.workdir
    models = {
        "shown": tiny_model(workdir, aliases=["s1", "s2"]),
        "hidden": tiny_model(workdir, "b", unlisted=True, aliases=["h"]),
    }
    swapper = swapper_factory(models=models, server={"list_aliases": True})
    client = sdk(swapper)
    listed = [m.model_dump() for m in client.models.list()]
    assert [m["id"] for m in listed] == ["shown", "s1", "s2"]
    assert [m.get("alias_of") for m in listed] == [None, "shown", "shown"]
    assert client.models.retrieve("hidden").id == "hidden"
    reply = client.chat.completions.create(model="h", messages=MESSAGES, max_tokens=1)
    assert reply.model == "hidden"
    assert swapper.model("hidden")["status"] == "LOADED"


def test_an_endpoint_ollama_lacks_is_404_and_starts_nothing(swapper_factory: Any) -> None:
    models = {
        "tiny-a": tiny_model(swapper_factory.workdir),
        # swapper runs this (fake) `ollama serve` itself when the model loads.
        "qwen": {"backend": "ollama", "model": "qwen3:8b", "serve": True, "binary": OLLAMA},
    }
    swapper = swapper_factory(models=models, env={"FAKE_OLLAMA_MODELS": PULLED})
    assert chat(swapper, "tiny-a").status_code == 200  # the resident model
    for path, body in [
        ("/v1/responses", {"model": "qwen", "input": "hi"}),
        ("/v1/rerank", {"model": "qwen", "query": "q", "documents": ["d"]}),
        ("/tokenize", {"model": "qwen", "content": "hi"}),
    ]:
        refused = swapper.http.post(path, json=body)
        assert refused.status_code == 404
        error = refused.json()["error"]
        assert error["code"] == "endpoint_not_supported"
        assert "'qwen'" in error["message"] and path in error["message"]
    status = swapper.status()["models"]
    assert status["qwen"]["status"] == "UNLOADED" and status["qwen"]["pid"] is None
    assert status["tiny-a"]["status"] == "LOADED"  # nothing was evicted for it
    assert processes_with(OLLAMA) == []
    # What Ollama does serve still loads it.
    assert chat(swapper, "qwen").status_code == 200
    assert processes_with(OLLAMA) != []


def test_a_reload_updates_the_model_list(swapper_factory: Any) -> None:
    workdir = swapper_factory.workdir
    swapper = swapper_factory(models={"m": tiny_model(workdir, aliases=["m1"])})
    assert [m["id"] for m in swapper.http.get("/v1/models").json()["data"]] == ["m"]
    config = yaml.safe_load(swapper.config_path.read_text())
    config["server"]["list_aliases"] = True
    config["models"]["n"] = tiny_model(workdir, "b", unlisted=True)
    swapper.config_path.write_text(yaml.safe_dump(config))
    assert swapper.http.post("/admin/reload").status_code == 200
    assert [m["id"] for m in swapper.http.get("/v1/models").json()["data"]] == ["m", "m1"]
    assert swapper.http.get("/v1/models/n").json()["status"] == "UNLOADED"
