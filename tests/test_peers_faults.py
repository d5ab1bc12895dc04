"""Peers that fail: a stopped or hung node, a refused key, a model the peer cannot load, a
connection dropped mid-stream, a client that hangs up; and two nodes that route a model to each
other without looping. Swappers here run without models of their own where none is needed."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MESSAGES, SwapperProcess, free_port, seconds, tiny_model, wait_until
from tests.test_disconnect import gated_llama_server, send_raw
from tests.test_peers import KEY2, node_workdir

pytestmark = pytest.mark.integration


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
        # Each node saw the request once from a client and once from its peer, no more. (The
        # log is read from the process's output on a thread: wait for both lines to arrive.)
        for node in started:
            wait_until(
                lambda node=node: node.output().count("/v1/chat/completions") >= 2,
                seconds(10),
                "both access-log lines",
            )
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
        wait_until(
            lambda: "POST /v1/chat/completions 404" in n2.output(), seconds(10), "n2's access line"
        )
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
    n2dir = node_workdir(tmp_path, "n2", tiny_models)
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
    n2dir = node_workdir(tmp_path, "n2", tiny_models)
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
