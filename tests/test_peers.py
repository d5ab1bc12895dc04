"""Two real swappers on loopback that list each other as peers, each with its own llama-server
model: requests for the other's model go through either node, streams and loading feedback
included; a stopped node is a 503 naming it; no request loops between them."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import MESSAGES, SwapperProcess, free_port, seconds, tiny_model, wait_until
from tests.test_disconnect import gated_llama_server, send_raw

pytestmark = pytest.mark.integration

KEY1 = "node1-secret-key-4f9a"
KEY2 = "node2-secret-key-7c21"


def _workdir(root: Path, name: str, tiny_models: dict[str, Path]) -> Path:
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
    """node1 serves tiny-a, node2 tiny-b; both have a tiny-c of their own; each lists the
    other as a peer (every model it lists), its key from the environment."""
    port1, port2 = free_port(), free_port()
    dir1 = _workdir(tmp_path, "node1", tiny_models)
    dir2 = _workdir(tmp_path, "node2", tiny_models)
    config1 = _config(
        port1,
        KEY1,
        {"tiny-a": tiny_model(dir1, "a", ctx_size=256), "tiny-c": tiny_model(dir1, "c")},
        {"node2": {"url": f"http://127.0.0.1:{port2}", "api_key": "${env:NODE2_KEY}"}},
    )
    config2 = _config(
        port2,
        KEY2,
        {"tiny-b": tiny_model(dir2, "b", ctx_size=256), "tiny-c": tiny_model(dir2, "c")},
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


def _bare_config(port: int, peers: dict[str, Any]) -> dict[str, Any]:
    return {
        "swapper": {"gpu_enabled": False, "shutdown_timeout": 5},
        "server": {"host": "127.0.0.1", "port": port},
        "models": {},
        "peers": peers,
    }


def test_two_nodes_that_route_a_model_to_each_other_never_loop(
    tmp_path: Path, llama_server: str
) -> None:
    """Both route ``ghost`` to the other, and neither has it: a 404, at once. One stops and
    comes back: the other notices both."""
    port1, port2 = free_port(), free_port()
    started: list[SwapperProcess] = []
    configs: dict[str, dict[str, Any]] = {}
    try:
        for name, port, other in (("n1", port1, port2), ("n2", port2, port1)):
            workdir = tmp_path / name
            workdir.mkdir()
            # refresh 1: a peer that is down is checked again every second
            peers = {
                "other": {"url": f"http://127.0.0.1:{other}", "models": ["ghost"], "refresh": 1}
            }
            configs[name] = _bare_config(port, peers)
            started.append(SwapperProcess(configs[name], workdir, llama_server, port=port))
        for node in started:
            wait_until(
                lambda node=node: node.status()["peers"]["other"]["up"],
                seconds(30),
                "the other node to be up",
            )
        for node in started:
            started_at = time.perf_counter()
            response = node.http.post(
                "/v1/chat/completions", json={"model": "ghost", "messages": MESSAGES}
            )
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "model_not_found"
            assert time.perf_counter() - started_at < seconds(5)
        # Each node saw the request once from a client and once from its peer, no more.
        for node in started:
            assert node.output().count("/v1/chat/completions") == 2, node.output()
        # n2 stops: n1 says so; n2 comes back on its port: n1 notices and forwards again.
        n1, n2 = started
        n2.stop()
        down = n1.http.post("/v1/chat/completions", json={"model": "ghost", "messages": MESSAGES})
        assert down.status_code == 503 and "'other'" in down.json()["error"]["message"]
        n2 = SwapperProcess(configs["n2"], tmp_path / "n2", llama_server, port=port2)
        started.append(n2)
        wait_until(lambda: n1.status()["peers"]["other"]["up"], seconds(30), "n1 to see n2 back up")
        back = n1.http.post("/v1/chat/completions", json={"model": "ghost", "messages": MESSAGES})
        assert back.status_code == 404
        assert n2.output().count("POST /v1/chat/completions 404") == 1, n2.output()
    finally:
        for node in started:
            node.stop()


def test_a_peer_that_hangs_on_connect_is_a_503_at_once_once_known_down(
    tmp_path: Path, llama_server: str
) -> None:
    """A peer whose address takes connections but never accepts them (a full backlog): its
    connect timeout is paid by the watcher, not by every request."""
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(0)
        # Fill the accept queue until a connection hangs (in SYN-SENT): so will the peer's.
        fillers: list[socket.socket] = []
        while True:
            filler = socket.socket()
            filler.settimeout(0.5)
            try:
                filler.connect(sink.getsockname())
            except TimeoutError:
                filler.close()
                break
            fillers.append(filler)
            assert len(fillers) < 64, "the listen backlog never filled"
        try:
            url = f"http://127.0.0.1:{sink.getsockname()[1]}"
            workdir = tmp_path / "n"
            workdir.mkdir()
            peers = {"stuck": {"url": url, "models": ["far"], "timeout": 1}}
            node = SwapperProcess(_bare_config(free_port(), peers), workdir, llama_server)
            try:
                wait_until(
                    lambda: node.status()["peers"]["stuck"]["up"] is False,
                    seconds(30),
                    "the stuck peer to be marked down",
                )
                for _ in range(3):
                    started = time.perf_counter()
                    response = node.http.post(
                        "/v1/chat/completions", json={"model": "far", "messages": MESSAGES}
                    )
                    assert response.status_code == 503
                    assert "'stuck'" in response.json()["error"]["message"]
                    # Well under the 1 s connect timeout each time.
                    assert time.perf_counter() - started < seconds(0.5)
            finally:
                node.stop()
        finally:
            for filler in fillers:
                filler.close()


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
    assert "POST /tokenize 200 model=tiny-b" in node1.output()


def test_a_peer_that_refuses_the_key_is_down_with_the_reason_and_the_key_hidden(
    tmp_path: Path, llama_server: str
) -> None:
    wrong = "wrong-key-0b5e77"
    n2dir, n1dir = tmp_path / "n2", tmp_path / "n1"
    n2dir.mkdir()
    n1dir.mkdir()
    n2_config = _bare_config(free_port(), {})
    n2_config["server"]["api_keys"] = [KEY2]
    n2 = SwapperProcess(n2_config, n2dir, llama_server, port=n2_config["server"]["port"])
    try:
        peers = {"n2": {"url": n2.url, "api_key": "${env:N2_KEY}", "models": ["far"]}}
        n1 = SwapperProcess(
            _bare_config(free_port(), peers), n1dir, llama_server, {"N2_KEY": wrong}
        )
        try:
            status = wait_until(
                lambda: (s := n1.status()["peers"]["n2"])["up"] is False and s,
                seconds(30),
                "n2 to be marked down",
            )
            assert status["last_error"] == "GET /v1/models answered HTTP 401"
            response = n1.http.post(
                "/v1/chat/completions", json={"model": "far", "messages": MESSAGES}
            )
            assert response.status_code == 503
            assert "'n2'" in response.json()["error"]["message"]
            assert "HTTP 401" in response.json()["error"]["message"]
            for text in (n1.output(), n2.output(), n1.http.get("/status").text, response.text):
                assert wrong not in text
        finally:
            n1.stop()
    finally:
        n2.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_a_client_that_hangs_up_cancels_the_request_on_the_peer(
    tmp_path: Path, llama_server: str, tiny_models: dict[str, Path], stream: bool
) -> None:
    """The client leaves while the peer's model loads: the peer hears it too and gives the
    queue place back (its llama-server starts only when the test opens a gate)."""
    n2dir = _workdir(tmp_path, "n2", tiny_models)
    wrapper, gate = gated_llama_server(tmp_path, llama_server)
    n2_config = _bare_config(free_port(), {})
    n2_config["models"] = {"tiny-b": tiny_model(n2dir, "b", binary=str(wrapper))}
    n2_config["swapper"]["loading_feedback_interval"] = 0.2
    n2 = SwapperProcess(n2_config, n2dir, llama_server, port=n2_config["server"]["port"])
    n1dir = tmp_path / "n1"
    n1dir.mkdir()
    try:
        n1 = SwapperProcess(_bare_config(free_port(), {"n2": {"url": n2.url}}), n1dir, llama_server)
        try:
            wait_until(lambda: n1.status()["peers"]["n2"]["up"], seconds(30), "n2 to be up")
            body = {"model": "tiny-b", "messages": MESSAGES, "max_tokens": 2, "stream": stream}
            sock = send_raw(n1, body)
            try:
                wait_until(
                    lambda: (m := n2.model("tiny-b"))["status"] == "LOADING" and m["queued"] == 1,
                    seconds(30),
                    "the forwarded request to wait on n2",
                )
                if stream:
                    head = sock.recv(65536)  # n2's 200 and loading comments, relayed
                    assert head.startswith(b"HTTP/1.1 200"), head[:200]
            finally:
                sock.close()
            wait_until(
                lambda: n2.model("tiny-b")["queued"] == 0,
                seconds(30),
                "n2 to hear of the hang-up through n1",
            )
            gate.touch()
            response = n1.http.post("/v1/chat/completions", json={**body, "stream": False})
            assert response.status_code == 200, response.text
        finally:
            n1.stop()
    finally:
        n2.stop()


def test_the_peers_own_errors_come_back_as_it_sent_them(
    tmp_path: Path, llama_server: str, tiny_models: dict[str, Path]
) -> None:
    """A model that cannot load on the peer: its 503, body and Retry-After, unchanged."""
    n2dir = _workdir(tmp_path, "n2", tiny_models)
    n2_config = _bare_config(free_port(), {})
    n2_config["models"] = {"broken": tiny_model(n2dir, "b", model_path=str(n2dir / "absent.gguf"))}
    n2 = SwapperProcess(n2_config, n2dir, llama_server, port=n2_config["server"]["port"])
    n1dir = tmp_path / "n1"
    n1dir.mkdir()
    try:
        n1 = SwapperProcess(_bare_config(free_port(), {"n2": {"url": n2.url}}), n1dir, llama_server)
        try:
            wait_until(lambda: n1.status()["peers"]["n2"]["up"], seconds(30), "n2 to be up")
            body = {"model": "broken", "messages": MESSAGES}
            direct = n2.http.post("/v1/chat/completions", json=body)
            assert direct.status_code == 503 and "retry-after" in direct.headers
            via = n1.http.post("/v1/chat/completions", json=body)
            assert via.status_code == direct.status_code
            assert via.headers["retry-after"] == direct.headers["retry-after"]
            assert via.json()["error"]["code"] == direct.json()["error"]["code"]
            assert "absent.gguf" in via.json()["error"]["message"]
            # n2 itself is up: only its model failed.
            assert n1.status()["peers"]["n2"]["up"] is True
        finally:
            n1.stop()
    finally:
        n2.stop()


class _CutOffPeer(http.server.BaseHTTPRequestHandler):
    """A peer that dies mid-stream: it lists ``cut``, and answers a chat with SSE headers and
    one event, then drops the connection (as a swapper killed mid-answer does) once told to."""

    protocol_version = "HTTP/1.1"
    cut = threading.Event()

    def log_message(self, fmt: str, *args: Any) -> None:  # (quiet: pytest shows failures)
        pass

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "cut", "object": "model"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()
        self.cut.wait(30)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def test_a_peer_that_dies_mid_stream_ends_the_stream_with_an_error_event(
    tmp_path: Path, llama_server: str
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutOffPeer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    workdir = tmp_path / "n1"
    workdir.mkdir()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        n1 = SwapperProcess(
            _bare_config(free_port(), {"fake": {"url": url}}), workdir, llama_server
        )
        try:
            wait_until(lambda: n1.status()["peers"]["fake"]["up"], seconds(30), "the peer up")
            body = {"model": "cut", "messages": MESSAGES, "stream": True}
            with n1.http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")  # the peer's first event, relayed
                _CutOffPeer.cut.set()
                rest = "\n".join(lines)
            error = json.loads(rest.strip().removeprefix("data: "))["error"]
            assert error["code"] == "peer_unavailable"
            assert "'fake' broke off the stream" in error["message"]
        finally:
            n1.stop()
    finally:
        _CutOffPeer.cut.set()
        server.shutdown()
        server.server_close()
