"""Connection hygiene against a real ``swapper serve``: a head must arrive in time and within
``max_header_bytes``, idle connections close, and connections are capped, so that no client
can starve /health or a chat before it has even authenticated."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tests.conftest import SwapperProcess, chat, wait_until

FLOOD_BYTES = 50 * 1024 * 1024
MAX_RSS_BYTES = 150 * 1000 * 1000
IDLE_SOCKETS = 2000


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _health_latencies(client: httpx.Client, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        latencies.append(time.perf_counter() - started)
    return latencies


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _openai_error(response: bytes, status: int) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response[:200]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["message"] and error["type"]
    return error  # type: ignore[no-any-return]


@contextmanager
def _nofile_soft_limit(soft: int) -> Iterator[None]:
    """Lower this process's soft NOFILE limit (children started meanwhile inherit it)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


class Flooder(threading.Thread):
    """Pushes one endless request head (a 50 MiB header), reconnecting whenever it is cut."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.pushing = threading.Event()
        self.sent: list[int] = []  # bytes pushed on each connection before it was cut
        self.completed = 0  # connections that took the whole 50 MiB

    def run(self) -> None:
        chunk = b"a" * 65536
        while not self.stop.is_set():
            sent = 0
            with socket.create_connection(("127.0.0.1", self.port)) as sock:
                try:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
                    while sent < FLOOD_BYTES and not self.stop.is_set():
                        sock.sendall(chunk)
                        sent += len(chunk)
                        self.pushing.set()
                except OSError:
                    self.sent.append(sent)
                    continue
            if sent >= FLOOD_BYTES:
                self.completed += 1
            self.sent.append(sent)


def test_header_flood_neither_starves_health_nor_grows_memory(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    with httpx.Client(base_url=swapper.url, timeout=30) as client:
        _health_latencies(client, 20)  # warm up
        quiet = _health_latencies(client, 50)
        flooder = Flooder(swapper.port)
        flooder.start()
        flooder.pushing.wait(timeout=30)
        rss: list[int] = []
        flooded: list[float] = []
        for _ in range(50):
            flooded += _health_latencies(client, 1)
            rss.append(_rss(swapper.proc.pid))
        flooder.stop.set()
        flooder.join(timeout=30)
    bound = max(0.1, 5 * max(quiet))  # 100 ms, unless this machine is slower than that unloaded
    print(
        f"/health quiet: p50 {statistics.median(quiet) * 1000:.1f} ms, max {max(quiet) * 1000:.1f} ms;"
        f" under the flood: p50 {statistics.median(flooded) * 1000:.1f} ms,"
        f" max {max(flooded) * 1000:.1f} ms (bound {bound * 1000:.0f} ms);"
        f" RSS max {max(rss) / 1e6:.1f} MB; connections cut after {flooder.sent[:5]} bytes"
    )
    assert flooder.completed == 0, "a 50 MiB head was taken in whole"
    # Cut near max_header_bytes; what the client could push before it noticed is mostly what
    # loopback socket buffers hold (a few MiB), far below the 50 MiB it tried.
    assert len(flooder.sent) > 1 and max(flooder.sent) < 16 * 1024 * 1024
    assert max(rss) < MAX_RSS_BYTES
    assert max(flooded) < bound


def test_oversized_head_is_431_in_openai_shape(swapper_factory: Any) -> None:
    swapper = swapper_factory(server={"max_header_bytes": 4096})
    fits = swapper.http.get("/health", headers={"X-Pad": "a" * 3000})
    assert fits.status_code == 200
    with socket.create_connection(("127.0.0.1", swapper.port)) as sock:
        # The whole head in one write: the cap holds even when the head is complete in one read.
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 5000 + b"\r\n\r\n"
        )
        error = _openai_error(_read_until_closed(sock, 10), 431)
    assert "4096" in error["message"]


def test_trickled_head_is_cut_off(swapper_factory: Any) -> None:
    header_timeout = 1.0
    swapper = swapper_factory(server={"header_timeout": header_timeout})
    # Long enough to outlast the bound below by far if nothing cuts it.
    trickle = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"[: int(header_timeout) + 8]
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", swapper.port)) as sock:
        received = b""
        for byte in trickle:  # one byte a second, until the server answers or hangs up
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable:
                received = _read_until_closed(sock, 10)
                break
        cut_after = time.monotonic() - started
    print(f"trickled head cut after {cut_after:.2f} s (header_timeout {header_timeout} s)")
    _openai_error(received, 408)
    assert header_timeout * 0.9 <= cut_after < header_timeout + 3  # one trickle step + a busy core


def test_idle_keepalive_connection_is_closed(swapper_factory: Any) -> None:
    keepalive = 1.0
    swapper = swapper_factory(server={"keepalive_timeout": keepalive, "header_timeout": 60})
    with socket.create_connection(("127.0.0.1", swapper.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        started = time.monotonic()
        received = _read_until_closed(sock, 30)
        closed_after = time.monotonic() - started
    print(f"idle keep-alive connection closed after {closed_after:.2f} s")
    assert received.startswith(b"HTTP/1.1 200 ")
    assert keepalive * 0.9 <= closed_after < keepalive + 3


def test_connections_beyond_the_cap_are_refused_with_503(swapper_factory: Any) -> None:
    cap, extra = 10, 10
    swapper = swapper_factory(server={"max_connections": cap, "header_timeout": 60})
    swapper.http.close()  # its pooled connection would take a place under the cap
    sockets = [socket.create_connection(("127.0.0.1", swapper.port)) for _ in range(cap + extra)]
    try:
        refused: dict[int, bytes] = {}

        def collect() -> bool:
            readable, _, _ = select.select(
                [s for s in sockets if s.fileno() not in refused], [], [], 0.1
            )
            for sock in readable:
                refused[sock.fileno()] = _read_until_closed(sock, 10)
            return len(refused) >= extra

        wait_until(collect, 30, f"{extra} connections to be refused")
        assert len(refused) <= extra + 1  # +1: the closed pooled connection may not be gone yet
        for response in refused.values():
            _openai_error(response, 503)
    finally:
        for sock in sockets:
            sock.close()
    with httpx.Client(base_url=swapper.url, timeout=10) as client:
        wait_until(lambda: client.get("/health").status_code == 200, 30, "/health once freed")


def test_a_chat_works_with_2000_idle_sockets_open(swapper_factory: Any) -> None:
    # A service manager's usual soft limit: swapper must lift its own to the hard limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > IDLE_SOCKETS + 200, f"hard NOFILE limit {hard}"
    with _nofile_soft_limit(1024):
        swapper: SwapperProcess = swapper_factory(server={"header_timeout": 300})
    pid = swapper.proc.pid
    fds_before = _open_fds(pid)
    sockets = [socket.create_connection(("127.0.0.1", swapper.port)) for _ in range(IDLE_SOCKETS)]
    try:
        wait_until(
            lambda: _open_fds(pid) >= fds_before + IDLE_SOCKETS, 60, "swapper to accept them"
        )
        response = chat(swapper, "a")
        assert response.status_code == 200, response.text
        assert _open_fds(pid) >= fds_before + IDLE_SOCKETS  # still held while the chat ran
    finally:
        for sock in sockets:
            sock.close()
