"""The lean route (swapper/http/lean.py): plain forwarded requests answered beneath ASGI.

It must be indistinguishable from the ASGI route it stands in for: the same answers, errors,
headers, request ids, access-log lines, metrics and activity records; pipelining and
keep-alive as uvicorn does them; a client that leaves cancels the work. The ASGI route is
reached with the same request sent with a chunked body, which the lean route never claims.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from swapper.http.lean import LeanRoute
from tests.conftest import MESSAGES, FakeApp, SwapperProcess, tiny_model, wait_until

CHAT = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2, "temperature": 0}


def _chunked(body: dict[str, Any]) -> Iterator[bytes]:
    """The body as an iterator: httpx sends it chunked, so only the ASGI route takes it."""
    yield json.dumps(body).encode()


def _served(swapper_factory: Any, **settings: Any) -> SwapperProcess:
    """swapper with tiny-a (ctx 512) resident."""
    swapper = swapper_factory(
        models={"tiny-a": tiny_model(swapper_factory.workdir, "a")},
        swapper={"default_model": "tiny-a", **settings},
    )
    swapper.wait_status("tiny-a", "LOADED")
    return swapper


def _raw(body: dict[str, Any], request_id: str, path: str = "/v1/chat/completions") -> bytes:
    """A request with a JSON body, as bytes for a raw socket."""
    payload = json.dumps(body).encode()
    return (
        b"POST %b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: %b\r\nContent-Length: %d\r\n\r\n%b"
        % (path.encode(), request_id.encode(), len(payload), payload)
    )


def _both(swapper: SwapperProcess, body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    """The same request on the lean route and on the ASGI route."""
    lean = swapper.http.post("/v1/chat/completions", json=body)
    routed = swapper.http.post(
        "/v1/chat/completions",
        content=_chunked(body),
        headers={"content-type": "application/json"},
    )
    return lean, routed


def _shape(response: httpx.Response) -> tuple[int, list[str], str | None]:
    # The header names (date and id change; content-length differs with the backend's ids).
    names = sorted(set(response.headers) - {"date", "x-request-id", "content-length"})
    return response.status_code, names, response.headers.get("retry-after")


@pytest.mark.integration
def test_the_lean_route_answers_as_the_asgi_route_does(swapper_factory: Any) -> None:
    missing = swapper_factory.workdir / "missing.gguf"
    swapper = swapper_factory(
        models={
            "tiny-a": tiny_model(swapper_factory.workdir, "a"),
            "broken": {"backend": "llamacpp", "model_path": str(missing)},
        },
        swapper={"default_model": "tiny-a"},
    )
    swapper.wait_status("tiny-a", "LOADED")
    # A whole answer: the same reply, word for word at temperature 0.
    lean, routed = _both(swapper, CHAT)
    assert _shape(lean) == _shape(routed) and lean.status_code == 200, (lean.text, routed.text)
    assert lean.headers["content-type"] == routed.headers["content-type"]
    reply = [r.json()["choices"][0]["message"]["content"] for r in (lean, routed)]
    assert reply[0] == reply[1]
    # A stream: the same events.
    lean, routed = _both(swapper, {**CHAT, "stream": True})
    assert _shape(lean) == _shape(routed) and lean.status_code == 200
    events = [
        [line for line in r.text.splitlines() if line.startswith("data: ")] for r in (lean, routed)
    ]
    assert len(events[0]) == len(events[1]) >= 3 and events[0][-1] == "data: [DONE]"
    # The backend's own error (llama-server refuses messages that are not a list).
    lean, routed = _both(swapper, {**CHAT, "messages": "hi"})
    assert _shape(lean) == _shape(routed) and lean.status_code == 400
    assert lean.json() == routed.json()
    # swapper's own error before any answer: a model that cannot start.
    lean, routed = _both(swapper, {**CHAT, "model": "broken"})
    assert _shape(lean) == _shape(routed) and lean.status_code == 503
    assert lean.json() == routed.json()
    assert "cannot start" in lean.json()["error"]["message"]


@pytest.mark.integration
def test_lean_requests_keep_their_ids_log_lines_metrics_and_activity(
    swapper_factory: Any,
) -> None:
    swapper = _served(swapper_factory)
    kept = swapper.http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "lean-1"})
    assert kept.status_code == 200 and kept.headers["x-request-id"] == "lean-1"
    # Without an id, one is made; the backend's own refusal (no --embeddings) is relayed.
    made = swapper.http.post("/v1/embeddings", json={"model": "tiny-a", "input": "hi"})
    assert made.status_code == 501, made.text
    made_id = made.headers["x-request-id"]
    assert len(made_id) == 16 and made_id != "lean-1"
    # An id that is not sane is replaced, as on every route.
    odd = swapper.http.post(
        "/v1/completions", json={**CHAT, "prompt": "hi"}, headers={"x-request-id": "no spaces"}
    )
    assert odd.headers["x-request-id"] != "no spaces"
    wait_until(lambda: "id=lean-1" in swapper.output(), 10, "the access-log line")
    assert "POST /v1/chat/completions 200 model=tiny-a" in swapper.output()
    assert "POST /v1/embeddings 501 model=tiny-a" in swapper.output()
    metrics = swapper.http.get("/metrics").text
    for endpoint, status in [
        ("/v1/chat/completions", 200),
        ("/v1/embeddings", 501),
        ("/v1/completions", 200),
    ]:
        labels = f'endpoint="{endpoint}",model="tiny-a",status="{status}"'
        line = f"swapper_requests_total{{{labels}}} 1.0"
        assert line in metrics, endpoint
    requests = swapper.http.get("/activity").json()["requests"]
    ours = {r["request_id"]: r for r in requests}
    assert ours["lean-1"]["endpoint"] == "/v1/chat/completions"
    assert ours["lean-1"]["status"] == "200" and ours["lean-1"]["model"] == "tiny-a"
    assert ours["lean-1"]["completion_tokens"] == 2
    assert ours[made_id]["endpoint"] == "/v1/embeddings"


def _read_response(sock: socket.socket, pending: bytes) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length from ``sock``; (response, bytes after it)."""
    data = pending
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


@pytest.mark.integration
def test_pipelined_requests_are_answered_in_order_on_one_connection(
    swapper_factory: Any,
) -> None:
    swapper = _served(swapper_factory)
    # Three in one write: lean, then one the ASGI route answers (an unknown model), then lean.
    with socket.create_connection(("127.0.0.1", swapper.port), timeout=30) as sock:
        sock.sendall(_raw(CHAT, "p1") + _raw({**CHAT, "model": "nope"}, "p2") + _raw(CHAT, "p3"))
        pending = b""
        answers = []
        for _ in range(3):
            answer, pending = _read_response(sock, pending)
            answers.append(answer)
        assert pending == b""
    for answer, (status, request_id) in zip(
        answers, [(b"200", b"p1"), (b"404", b"p2"), (b"200", b"p3")], strict=True
    ):
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert b"x-request-id: " + request_id + b"\r\n" in answer
    assert b'"model_not_found"' in answers[1]
    assert json.loads(answers[2].partition(b"\r\n\r\n")[2])["choices"]


def _scope(
    headers: list[tuple[bytes, bytes]], *, method: str = "POST", path: str = "/v1/chat/completions"
) -> dict[str, Any]:
    base = [(b"host", b"127.0.0.1:8890"), (b"content-type", b"application/json")]
    return {
        "method": method,
        "path": path,
        "headers": [*base, *headers],
        "server": ("127.0.0.1", 8890),
    }


@pytest.mark.anyio
async def test_which_requests_the_lean_route_claims(fake_app: FakeApp) -> None:
    server = {"api_keys": ["sk-good"], "max_request_bytes": 1000}
    async with fake_app(server=server) as client:
        app = client.app
        lean = LeanRoute(app, app.state.config.server)
        key = (b"authorization", b"Bearer sk-good")
        length = (b"content-length", b"100")
        assert lean.claims(_scope([key, length]))
        assert lean.claims(_scope([(b"x-api-key", b"sk-good"), length]))
        assert lean.claims(_scope([key, length], path="/v1/embeddings"))
        refused = [
            _scope([length]),  # no key: the ASGI route words the 401
            _scope([(b"authorization", b"Bearer sk-bad"), length]),
            _scope([key, (b"content-length", b"1001")]),  # over max_request_bytes: a 413
            _scope([key]),  # no length
            _scope([key, (b"transfer-encoding", b"chunked")]),
            _scope([key, length, (b"origin", b"http://127.0.0.1:8890")]),  # CORS
            _scope([key, length], method="GET"),
            _scope([key, length], path="/v1/messages"),
            {**_scope([key, length]), "headers": [(b"host", b"evil.example"), key, length]},
            {**_scope([key, length]), "headers": [(b"content-type", b"text/plain"), key, length]},
            # A header given twice: which one counts is the ASGI route's to say.
            _scope([(b"authorization", b"Bearer sk-bad"), key, length]),
            _scope([key, length, (b"content-length", b"100")]),
            {
                **_scope([key, length]),
                "headers": [*_scope([key, length])["headers"], (b"host", b"evil.example")],
            },
        ]
        for scope in refused:
            assert not lean.claims(scope), scope


def _access_lines(swapper: SwapperProcess, marker: str) -> list[str]:
    return [line for line in swapper.output().splitlines() if f"id={marker}" in line]


def _seconds_of(line: str) -> float:
    return float(
        next(word for word in line.split() if word.endswith("s") and word[0].isdigit())[:-1]
    )


@pytest.mark.integration
def test_a_pipelining_client_that_never_reads_is_not_answered_ahead(
    swapper_factory: Any,
) -> None:
    swapper = _served(swapper_factory)
    # Each answer is about 2.6 MB (400 tokens with 100 candidates each); a client that sends
    # 10 at once and reads nothing must not make swapper run them all and buffer the answers.
    # (How many go out before the writes pause depends on the kernel's socket buffers: with
    # Linux's usual 4 MiB ceiling, two.)
    count = 10
    body = {"model": "tiny-a", "prompt": "hi", "max_tokens": 400, "n_probs": 100, "temperature": 0}
    requests = b"".join(_raw(body, f"piped-{n}", "/v1/completions") for n in range(count))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", swapper.port))
        sock.sendall(requests)
        # The time one answer takes here, measured.
        started = time.monotonic()
        wait_until(lambda: _access_lines(swapper, "piped-"), 60, "the first answer")
        each = time.monotonic() - started
        # Answered ahead, all of them would be done in count x each; give it twice that.
        deadline = time.monotonic() + max(2 * count * each, 2.0)
        while time.monotonic() < deadline and len(_access_lines(swapper, "piped-")) <= count // 2:
            time.sleep(0.05)
        ahead = len(_access_lines(swapper, "piped-"))
        assert ahead <= count // 2, f"{ahead} of {count} answered to a client that read nothing"
    # The client hangs up with answers unread: whatever was under way ends, and the model serves.
    wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 0, 30, "the requests to end")
    assert swapper.http.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.integration
def test_a_request_still_running_at_the_shutdown_deadline_gets_a_503(
    swapper_factory: Any,
) -> None:
    swapper = _served(swapper_factory, shutdown_timeout=1)
    pid = swapper.model("tiny-a")["pid"]
    os.kill(pid, signal.SIGSTOP)  # the backend takes the request and never answers
    try:
        with socket.create_connection(("127.0.0.1", swapper.port), timeout=30) as sock:
            sock.sendall(_raw(CHAT, "at-deadline"))
            wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 1, 30, "the request")
            swapper.signal(signal.SIGTERM)
            answer = b""
            while chunk := sock.recv(65536):  # until swapper closes the connection
                answer += chunk
    finally:
        os.kill(pid, signal.SIGCONT)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"connection: close\r\n" in answer and b"x-request-id: at-deadline\r\n" in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"] == (
        "swapper is shutting down"
    )
    swapper.proc.wait(timeout=30)
    assert "POST /v1/chat/completions 503 model=tiny-a" in swapper.output()


@pytest.mark.integration
def test_an_upload_is_timed_from_its_first_byte_and_a_departed_uploader_is_recorded(
    swapper_factory: Any,
) -> None:
    swapper = _served(swapper_factory)
    # A slow upload: the access log's duration counts the time the body took to arrive.
    slow = _raw(CHAT, "slow-upload")
    start = slow.index(b"\r\n\r\n") + 4 + 5  # the head and 5 bytes of the body
    pause = 0.5
    with socket.create_connection(("127.0.0.1", swapper.port), timeout=30) as sock:
        sock.sendall(slow[:start])
        time.sleep(pause)  # the stimulus: a client slow to send its body
        sock.sendall(slow[start:])
        answer, _ = _read_response(sock, b"")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    wait_until(lambda: _access_lines(swapper, "slow-upload"), 10, "the access-log line")
    assert _seconds_of(_access_lines(swapper, "slow-upload")[0]) >= pause
    # One that leaves half-way through its body is still counted and logged.
    with socket.create_connection(("127.0.0.1", swapper.port), timeout=30) as sock:
        left = _raw(CHAT, "left-upload")
        sock.sendall(left[: left.index(b"\r\n\r\n") + 4 + 5])
    wait_until(lambda: _access_lines(swapper, "left-upload"), 10, "the access-log line")
    assert "POST /v1/chat/completions 500 model=-" in _access_lines(swapper, "left-upload")[0]
    metrics = swapper.http.get("/metrics").text
    assert 'swapper_requests_total{endpoint="unmatched",model="",status="500"} 1.0' in metrics
