"""A port taken between swapper picking it and llama-server binding it: start again elsewhere."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

import swapper.backends.contract
from swapper.backends.registry import load_backends
from swapper.config import parse_config
from swapper.http.app import create_app
from tests.conftest import MESSAGES

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def squatted_port() -> Iterator[int]:
    """A loopback port another process already listens on."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        yield int(squatter.getsockname()[1])


async def test_port_taken_before_the_backend_binds_is_retried(
    squatted_port: int,
    llama_server: str,
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_free_port = swapper.backends.contract.free_port
    picks = iter([squatted_port])

    def first_pick_is_taken(host: str = "127.0.0.1") -> int:
        # The race made certain: the first port handed out is one somebody else holds.
        return next(picks, None) or real_free_port(host)

    monkeypatch.setattr(swapper.backends.contract, "free_port", first_pick_is_taken)
    registry = load_backends()
    config = parse_config(
        {
            "swapper": {"gpu_enabled": False, "model_swap_timeout": 30, "stop_timeout": 5},
            "models": {
                "tiny-a": {
                    "backend": "llamacpp",
                    "model_path": str(tiny_models["a"]),
                    "binary": llama_server,
                    "ctx_size": 512,
                }
            },
        },
        "ports.yaml",
        registry.schemas(),
    )
    async with AsyncTestClient(create_app(config, registry), timeout=30) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2}
        )
        assert response.status_code == 200, response.text
        status = (await client.get("/status")).json()["models"]["tiny-a"]
        assert status["status"] == "LOADED" and status["port"] != squatted_port
    assert f"port {squatted_port} was taken" in caplog.text
