"""Two real swappers on loopback that list each other as peers, each with its own llama-server
model: requests for the other's model go through either node on every routed endpoint, streams
and loading feedback included; each lists the other's models; a stopped node is a 503 naming it.
Failures and loops: tests/test_peers_faults.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest

from tests.conftest import MESSAGES, SwapperProcess, free_port, seconds, tiny_model, wait_until

pytestmark = pytest.mark.integration

KEY1 = "node1-secret-key-4f9a"
KEY2 = "node2-secret-key-7c21"


def node_workdir(root: Path, name: str, tiny_models: dict[str, Path]) -> Path:
    """A node's own folder (its config, log and state), with the tiny models linked in."""
    workdir = root / name
    workdir.mkdir()
    for path in tiny_models.values():
        (workdir / path.name).symlink_to(path)
    return workdir


def _config(port: int, key: str, models: dict[str, Any], peers: dict[str, Any]) -> dict[str, Any]:
    return {
        "swapper": {
            "mode": "multi-active",
            "max_concurrent_models": 2,
            "gpu_enabled": False,
            "model_swap_timeout": 30,
            "stop_timeout": 5,
            "shutdown_timeout": 5,
            # Tiny models load in tens of milliseconds: a short interval makes the loading
            # comments show while one loads (no llama-server is ready within 10 ms of its exec).
            "loading_feedback_interval": 0.01,
        },
        "server": {"host": "127.0.0.1", "port": port, "api_keys": [key]},
        "models": models,
        "peers": peers,
    }


def _authorise(node: SwapperProcess, key: str) -> SwapperProcess:
    node.http.headers["Authorization"] = f"Bearer {key}"
    return node


@pytest.fixture
def nodes(
    tmp_path: Path, llama_server: str, tiny_models: dict[str, Path]
) -> Iterator[tuple[SwapperProcess, SwapperProcess]]:
    """node1 serves tiny-a, node2 tiny-b (alias ``bee``); both have a tiny-c of their own; each
    lists the other as a peer (every model it lists), its key from the environment."""
    port1, port2 = free_port(), free_port()
    dir1 = node_workdir(tmp_path, "node1", tiny_models)
    dir2 = node_workdir(tmp_path, "node2", tiny_models)
    config1 = _config(
        port1,
        KEY1,
        {"tiny-a": tiny_model(dir1, "a", ctx_size=256), "tiny-c": tiny_model(dir1, "c")},
        {"node2": {"url": f"http://127.0.0.1:{port2}", "api_key": "${env:NODE2_KEY}"}},
    )
    config2 = _config(
        port2,
        KEY2,
        {
            "tiny-b": tiny_model(dir2, "b", ctx_size=256, aliases=["bee"]),
            "tiny-c": tiny_model(dir2, "c"),
        },
        {"node1": {"url": f"http://127.0.0.1:{port1}", "api_key": "${env:NODE1_KEY}"}},
    )
    env = {"NODE1_KEY": KEY1, "NODE2_KEY": KEY2}
    started: list[SwapperProcess] = []
    try:
        node1 = SwapperProcess(config1, dir1, llama_server, env, port=port1)
        started.append(node1)
        node2 = SwapperProcess(config2, dir2, llama_server, env, port=port2)
        started.append(node2)
        _authorise(node1, KEY1)
        _authorise(node2, KEY2)
        for node, peer in ((node1, "node2"), (node2, "node1")):
            wait_until(
                lambda node=node, peer=peer: node.status()["peers"][peer]["up"],
                seconds(30),
                f"{peer} to be up",
            )
        yield node1, node2
    finally:
        for node in started:
            node.stop()


def _client(node: SwapperProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key=key, max_retries=0)


def test_chat_and_stream_through_either_node(nodes: tuple[SwapperProcess, SwapperProcess]) -> None:
    node1, node2 = nodes
    for node, key, theirs in ((node1, KEY1, "tiny-b"), (node2, KEY2, "tiny-a")):
        client = _client(node, key)
        reply = client.chat.completions.create(model=theirs, messages=MESSAGES, max_tokens=2)
        assert reply.model == theirs
        assert reply.choices[0].finish_reason in ("stop", "length")
        chunks = list(
            client.chat.completions.create(
                model=theirs,
                messages=MESSAGES,
                max_tokens=3,
                stream=True,
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Each node ran its own model only: the other's requests were served where the model is.
    assert node1.model("tiny-a")["status"] == "LOADED"
    assert "tiny-b" not in node1.status()["models"]
    assert "tiny-a" not in node2.status()["models"]
    assert node2.model("tiny-b")["status"] == "LOADED"


def test_stream_carries_the_peers_loading_feedback(
    nodes: tuple[SwapperProcess, SwapperProcess],
) -> None:
    node1, node2 = nodes
    assert node2.model("tiny-b")["status"] == "UNLOADED"
    body = {"model": "tiny-b", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    with node1.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = b"".join(response.iter_bytes()).decode()
    assert ": loading tiny-b" in text  # node2's own comments, relayed by node1
    assert text.rstrip().endswith("data: [DONE]")


def test_each_node_lists_the_others_models(nodes: tuple[SwapperProcess, SwapperProcess]) -> None:
    node1, node2 = nodes
    for node, mine, theirs, peer in (
        (node1, "tiny-a", "tiny-b", "node2"),
        (node2, "tiny-b", "tiny-a", "node1"),
    ):
        listed = node.http.get("/v1/models").json()["data"]
        owners = {entry["id"]: entry["owned_by"] for entry in listed}
        # A local model of the same id wins, and is listed once.
        assert owners == {mine: "swapper", "tiny-c": "swapper", theirs: peer}
        assert [entry["id"] for entry in listed].count("tiny-c") == 1
        one = node.http.get(f"/v1/models/{theirs}")
        assert one.status_code == 200 and one.json()["owned_by"] == peer
        # Another swapper asking (the hop header) hears about local models only.
        local = node.http.get("/v1/models", headers={"X-Swapper-Hop": "1"}).json()["data"]
        assert {entry["id"] for entry in local} == {mine, "tiny-c"}
        # The peers section: up, no error, the peer's models; the key nowhere.
        status = node.http.get("/status")
        assert status.json()["peers"][peer] == {
            "url": status.json()["peers"][peer]["url"],
            "up": True,
            "last_error": None,
            "models": sorted([theirs, "tiny-c"]),
        }
        assert KEY1 not in status.text and KEY2 not in status.text


def test_a_stopped_node_is_a_503_naming_it_and_local_models_still_serve(
    nodes: tuple[SwapperProcess, SwapperProcess],
) -> None:
    node1, node2 = nodes
    node2.stop()
    client = _client(node1, KEY1)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=2)
    assert caught.value.status_code == 503
    assert "'node2'" in caught.value.message
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # Known down now: the next request is answered without trying the peer again.
    status = node1.status()["peers"]["node2"]
    assert status["up"] is False and status["last_error"]
    started = time.perf_counter()
    again = node1.http.post(
        "/v1/chat/completions", json={"model": "tiny-b", "messages": MESSAGES, "max_tokens": 2}
    )
    assert again.status_code == 503 and "retry-after" in again.headers
    assert again.json()["error"]["code"] == "peer_unavailable"
    assert "node2" in again.json()["error"]["message"]
    assert time.perf_counter() - started < seconds(1)
    # A stream fails the same way, before any 200.
    streamed = node1.http.post(
        "/v1/chat/completions",
        json={"model": "tiny-b", "messages": MESSAGES, "max_tokens": 2, "stream": True},
    )
    assert streamed.status_code == 503
    # Its own models are served as ever.
    reply = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=2)
    assert reply.model == "tiny-a"
    for text in (node1.output(), node2.output(), node1.http.get("/status").text):
        assert KEY1 not in text and KEY2 not in text


def test_unknown_model_with_peers_is_still_a_404(
    nodes: tuple[SwapperProcess, SwapperProcess],
) -> None:
    node1, _ = nodes
    response = node1.http.post(
        "/v1/chat/completions", json={"model": "nowhere", "messages": MESSAGES}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_every_routed_endpoint_reaches_the_peer(
    nodes: tuple[SwapperProcess, SwapperProcess],
) -> None:
    """Anthropic's Messages API, llama.cpp's own endpoints, the raw passthrough and an upload:
    each through node1 to node2's model, answered as node2 answers it."""
    node1, node2 = nodes
    client = anthropic.Anthropic(base_url=node1.url, api_key=KEY1, max_retries=0)
    message = client.messages.create(model="tiny-b", max_tokens=2, messages=MESSAGES)
    assert message.type == "message" and message.model == "tiny-b"
    body = {"model": "tiny-b", "content": "hello peers"}
    via_peer = node1.http.post("/tokenize", json=body)
    direct = node2.http.post("/tokenize", json=body)
    assert via_peer.status_code == 200 and via_peer.content == direct.content
    props = node1.http.get("/upstream/tiny-b/props")
    assert (
        props.status_code == 200 and props.json() == node2.http.get("/upstream/tiny-b/props").json()
    )
    # An upload is relayed to node2, which reads its model field and answers for its model.
    files = [("model", (None, "tiny-b")), ("file", ("a.wav", b"RIFF" * 4096))]
    upload = node1.http.post("/v1/audio/transcriptions", files=files)
    assert upload.status_code == 404, upload.text
    assert upload.json()["error"]["code"] == "endpoint_not_supported"
    assert "'tiny-b'" in upload.json()["error"]["message"]
    # node1's access log names the model it forwarded.
    wait_until(
        lambda: "POST /tokenize 200 model=tiny-b" in node1.output(),
        seconds(10),
        "node1's access line",
    )


def test_a_peers_alias_reaches_the_peer(nodes: tuple[SwapperProcess, SwapperProcess]) -> None:
    """node2 lists ``bee`` as an alias of tiny-b; node1 routes it there, and node2 resolves it."""
    node1, node2 = nodes
    reply = _client(node1, KEY1).chat.completions.create(
        model="bee", messages=MESSAGES, max_tokens=2
    )
    assert reply.choices[0].message is not None
    assert node2.status()["models"]["tiny-b"]["status"] == "LOADED"
    assert "tiny-b" not in node1.status()["models"]


def test_ollamas_api_reaches_the_peer(nodes: tuple[SwapperProcess, SwapperProcess]) -> None:
    """The ollama client on node1, for node2's model as Ollama names it (``:latest``)."""
    node1, _ = nodes
    client = ollama.Client(host=node1.url, headers={"Authorization": f"Bearer {KEY1}"})
    reply = client.chat(
        model="tiny-b:latest", messages=MESSAGES, options={"num_predict": 2}, stream=False
    )
    assert reply.model == "tiny-b:latest" and reply.done
    parts = list(
        client.generate(model="tiny-b", prompt="hi", options={"num_predict": 2}, stream=True)
    )
    assert parts and parts[-1].done and parts[-1].model == "tiny-b"
    shown = client.show("tiny-b")
    assert shown.modelinfo is not None
    # The list Ollama clients pick from: node2's model with node2's own details (read from its
    # GGUF there), node1's tiny-c once (the local one wins); node2 hears of its own only.
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"tiny-a:latest", "tiny-b:latest", "tiny-c:latest"}
    assert listed["tiny-b:latest"].size and listed["tiny-b:latest"].digest
    own = node1.http.get("/api/tags", headers={"X-Swapper-Hop": "1"}).json()["models"]
    assert {m["name"] for m in own} == {"tiny-a:latest", "tiny-c:latest"}
    wait_until(
        lambda: "POST /api/chat 200 model=tiny-b" in node1.output(),
        seconds(10),
        "node1's access line",
    )
