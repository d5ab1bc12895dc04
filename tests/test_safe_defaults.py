"""Safe by default: protected mode, keys from the environment, the Origin and Host checks, the
schema behind the keys with nothing from CDNs, and deeply nested JSON as a 400."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from swapper.backends.registry import load_backends
from swapper.config import ServerSettings, load_config, parse_config, protected_mode_refusal
from swapper.errors import ConfigError
from swapper.http.access import HostOriginGuard
from tests.conftest import MESSAGES, FakeApp, SwapperProcess, free_port
from tests.fakes import FakeWorld

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = load_backends().schemas()
CHAT = {"model": "a", "messages": MESSAGES}
OWN = "http://testserver.local"  # the test client's base URL: swapper's own origin there


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """The message of an OpenAI error JSON reply with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    return error["message"]  # type: ignore[no-any-return]


def config_of(server: dict[str, Any]) -> Any:
    return parse_config({"server": server, "models": {}}, "p.yaml", SCHEMAS)


# -- protected mode -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost"]
)
def test_loopback_needs_no_keys(host: str) -> None:
    assert protected_mode_refusal(config_of({}), host) is None


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.5", "gpu-node.lan", "127.evil.example", ""]
)
def test_protected_mode_refuses_a_network_address_without_keys(host: str) -> None:
    refusal = protected_mode_refusal(config_of({}), host)
    assert refusal is not None and "\n" not in refusal
    assert "server.api_keys" in refusal and "server.allow_unauthenticated" in refusal
    # Keys, or saying in so many words that an open server is meant, lift the refusal.
    assert protected_mode_refusal(config_of({"api_keys": ["k"]}), host) is None
    assert protected_mode_refusal(config_of({"admin_api_keys": ["k"]}), host) is None
    assert protected_mode_refusal(config_of({"allow_unauthenticated": True}), host) is None


@pytest.mark.parametrize("value", [None, ""])
def test_a_missing_or_empty_key_variable_stops_the_config(
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
) -> None:
    monkeypatch.setenv("SWAPPER_ADMIN_KEY", "admin")
    if value is None:
        monkeypatch.delenv("SWAPPER_API_KEY", raising=False)
    else:
        monkeypatch.setenv("SWAPPER_API_KEY", value)
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "config/swapper_config.yaml", SCHEMAS)
    message = info.value.message
    state = "not set" if value is None else "empty"
    assert message.endswith(
        f"$.server.api_keys[0]: environment variable SWAPPER_API_KEY is {state}"
    )
    assert "\n" not in message


def test_the_shipped_gpu_config_serves_the_network_with_keys_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWAPPER_API_KEY", "plain-1")
    monkeypatch.setenv("SWAPPER_ADMIN_KEY", "admin-1")
    config = load_config(ROOT / "config/swapper_config.yaml", SCHEMAS)
    assert (config.server.api_keys, config.server.admin_api_keys) == (["plain-1"], ["admin-1"])
    assert not config.server.allow_unauthenticated
    assert protected_mode_refusal(config, config.server.host) is None
    compose = (ROOT / "compose.yaml").read_text()
    assert "SWAPPER_API_KEY: ${SWAPPER_API_KEY:?" in compose
    assert "SWAPPER_ADMIN_KEY: ${SWAPPER_ADMIN_KEY:?" in compose


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_may_serve_on_its_own_host(
    monkeypatch: pytest.MonkeyPatch,
    path: Path,
) -> None:
    monkeypatch.setenv("SWAPPER_API_KEY", "plain-1")
    monkeypatch.setenv("SWAPPER_ADMIN_KEY", "admin-1")
    # The seed's node configs (node1.yaml, node2.yaml) name each node's keys.
    for node in ("NODE1", "NODE2"):
        monkeypatch.setenv(f"{node}_KEY", f"{node.lower()}-plain")
        monkeypatch.setenv(f"{node}_ADMIN_KEY", f"{node.lower()}-admin")
    config = load_config(path, SCHEMAS)
    assert protected_mode_refusal(config, config.server.host) is None


# -- Origin ---------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "http://testserver.local:81",
        "https://testserver.local",
        "http://127.0.0.1:8890",
    ],
)
async def test_a_foreign_origin_is_refused_before_anything_runs(
    fake_app: FakeApp,
    world: FakeWorld,
    origin: str,
) -> None:
    async with fake_app() as client:
        # A "no-cors" POST as a web page can send it: text/plain, no preflight.
        response = await client.post(
            "/v1/chat/completions",
            content=httpx.Request("POST", "http://x", json=CHAT).read(),
            headers={"Origin": origin, "Content-Type": "text/plain"},
        )
        assert origin in error_of(response, 403, "origin_not_allowed")
        error_of(
            await client.post("/models/a/load", headers={"Origin": origin}),
            403,
            "origin_not_allowed",
        )
    assert world.events == []  # nothing was loaded


@pytest.mark.anyio
async def test_own_origin_listed_origins_and_no_origin_are_served(fake_app: FakeApp) -> None:
    async with fake_app(server={"cors_origins": ["http://ui.example"]}) as client:
        for headers in ({}, {"Origin": OWN}, {"Origin": "http://ui.example"}):
            response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert response.status_code == 200, (headers, response.text)
            assert response.json()["choices"][0]["message"]["content"] == "ok"
        listed = await client.get("/v1/models", headers={"Origin": "http://ui.example"})
        assert listed.headers["access-control-allow-origin"] == "http://ui.example"


@pytest.mark.anyio
async def test_the_dashboard_works_from_its_own_origin(fake_app: FakeApp) -> None:
    async with fake_app() as client:
        page = await client.get("/ui")
        assert page.status_code == 200 and b"<html" in page.content.lower()
        # The page's own calls carry its origin (browsers send Origin on a same-origin POST).
        loaded = await client.post("/models/a/load", headers={"Origin": OWN})
        assert loaded.status_code == 200 and loaded.json()["status"] == "LOADED"
        status = await client.get("/status", headers={"Origin": OWN})
        assert status.json()["models"]["a"]["status"] == "LOADED"


# -- Host -----------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8890",
        "127.0.0.1:8890",
        "127.3.2.1",
        "[::1]:8890",
        "[::1]",
        "LOCALHOST:1",
        "10.0.0.7:8890",
        "gpu-node.lan:8890",
        "GPU-Node.lan",
    ],
)
async def test_loopback_bound_and_allowed_hosts_are_served(fake_app: FakeApp, host: str) -> None:
    server = {"host": "10.0.0.7", "allowed_hosts": ["gpu-node.lan"]}
    async with fake_app(server=server) as client:
        response = await client.get("/health", headers={"Host": host})
        assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8890",
        "127.evil.example",
        "localhost.evil.example",
        "10.0.0.8",
        "[::2]:8890",
    ],
)
async def test_other_host_names_are_refused_dns_rebinding(
    fake_app: FakeApp,
    world: FakeWorld,
    host: str,
) -> None:
    server = {"host": "10.0.0.7", "allowed_hosts": ["gpu-node.lan"]}
    async with fake_app(server=server) as client:
        error_of(await client.get("/health", headers={"Host": host}), 403, "host_not_allowed")
        error_of(
            await client.post("/v1/chat/completions", json=CHAT, headers={"Host": host}),
            403,
            "host_not_allowed",
        )
    assert world.events == []


@pytest.mark.anyio
async def test_allowed_hosts_star_accepts_any_host(fake_app: FakeApp) -> None:
    async with fake_app(server={"allowed_hosts": ["*"]}) as client:
        response = await client.get("/health", headers={"Host": "anything.example"})
        assert response.json() == {"status": "ok"}


def test_the_address_a_connection_came_in_on_is_its_own_host() -> None:
    guard = HostOriginGuard(None, ServerSettings(host="0.0.0.0"))  # type: ignore[arg-type]

    def scope(host: bytes, local: str) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "http",
            "server": (local, 8890),
            "headers": [(b"host", host), (b"accept", b"*/*")],
        }

    assert guard._check(scope(b"192.168.1.5:8890", "192.168.1.5")) is None
    assert guard._check(scope(b"192.168.1.5:8890", "::ffff:192.168.1.5")) is None  # dual stack
    assert guard._check(scope(b"[fe80::1]:8890", "fe80::1")) is None
    assert guard._check(scope(b"192.168.1.6:8890", "192.168.1.5")) is not None
    assert guard._check(scope(b"0.0.0.0:8890", "192.168.1.5")) is not None  # no wildcard names


@pytest.mark.anyio
async def test_a_refused_websocket_is_closed_before_the_app_sees_it() -> None:
    reached: list[Any] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    guard = HostOriginGuard(app, ServerSettings())
    scope = {
        "type": "websocket",
        "scheme": "ws",
        "server": ("127.0.0.1", 8890),
        "headers": [(b"host", b"127.0.0.1:8890"), (b"origin", b"http://evil.example")],
    }
    await guard(scope, None, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": ""}] and reached == []
    await guard({**scope, "headers": scope["headers"][:1]}, None, send)  # type: ignore[arg-type]
    assert len(reached) == 1


def test_a_real_swapper_refuses_a_rebound_host_name(swapper_factory: Any) -> None:
    swapper: SwapperProcess = swapper_factory()
    port = swapper.port
    assert swapper.http.get("/health", headers={"Host": f"localhost:{port}"}).status_code == 200
    rebound = swapper.http.get("/health", headers={"Host": f"attacker.example:{port}"})
    error_of(rebound, 403, "host_not_allowed")
    foreign = swapper.http.post(
        "/v1/chat/completions",
        json={"model": "a", "messages": MESSAGES},
        headers={"Origin": "http://attacker.example"},
    )
    error_of(foreign, 403, "origin_not_allowed")
    assert swapper.backends() == []  # refused before any model was loaded


# -- the schema -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_schema_is_behind_the_keys_and_loads_nothing_from_elsewhere(
    fake_app: FakeApp,
) -> None:
    async with fake_app(server={"api_keys": ["k1"]}) as client:
        for path in ("/schema", "/schema/openapi.json", "/schema/openapi.yaml"):
            error_of(await client.get(path), 401, "invalid_api_key")
            response = await client.get(path, headers={"x-api-key": "k1"})
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith("application/vnd.oai.openapi")
            assert "/v1/chat/completions" in response.text
            assert "<script" not in response.text and "cdn" not in response.text.lower()
        # The HTML viewers (they pull scripts and fonts from CDNs) are not served.
        for viewer in ("swagger", "redoc", "elements", "rapidoc", "scalar"):
            error_of(
                await client.get(f"/schema/{viewer}", headers={"x-api-key": "k1"}), 404, "not_found"
            )


# -- nesting --------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_json_nested_too_deeply_is_a_400(
    fake_app: FakeApp,
    world: FakeWorld,
    caplog: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    depth = 100_000
    body = (
        b'{"model": "a", "stream": %s, "messages": ' % str(stream).lower().encode()
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )
    async with fake_app() as client:
        response = await client.post("/v1/chat/completions", content=body)
        assert "nested too deeply" in error_of(response, 400, "nested_too_deeply")
        # Moderate nesting still goes through to the backend.
        fine = b'{"model": "a", "messages": [], "x": ' + b"[" * 50 + b"]" * 50 + b"}"
        ok = await client.post("/v1/chat/completions", content=fine)
        assert ok.json()["choices"][0]["message"]["content"] == "ok"
    assert "RecursionError" not in caplog.text and "unhandled" not in caplog.text


@pytest.mark.parametrize(
    ("config_host", "flag"), [("192.0.2.1", []), ("127.0.0.1", ["--host", "192.0.2.1"])]
)
def test_serve_refuses_a_network_address_without_keys(
    tmp_path: Path,
    config_host: str,
    flag: list[str],
) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: were protected mode broken, uvicorn would
    # fail to bind it (exit 1) instead of opening an unauthenticated port to the network.
    path = tmp_path / "open.yaml"
    path.write_text(f"server: {{host: {config_host!r}, port: {free_port()}}}\nmodels: {{}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "swapper", "serve", "--config", str(path), *flag],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "server.api_keys" in lines[0] and "server.allow_unauthenticated" in lines[0]
    assert "192.0.2.1" in lines[0]
