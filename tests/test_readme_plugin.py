"""The README's "Write your own backend" example, run as written against a real llama-server."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from swapper.backends.registry import load_backends
from swapper.config import parse_config
from swapper.errors import ConfigError
from swapper.http.app import create_app
from tests.conftest import MESSAGES

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def readme_plugin(tmp_path: Path) -> ModuleType:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Write your own backend", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "the README lost its plugin example"
    path = tmp_path / "swapper_readme_example.py"
    path.write_text(code.group(1))
    spec = importlib.util.spec_from_file_location("swapper_readme_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kind_of(plugin: ModuleType) -> str:
    """The backend kind the README's plugin registers (whatever the README names it)."""
    kinds = [
        name
        for name, cls in load_backends(plugin).backends.items()
        if cls.__module__ == plugin.__name__
    ]
    assert len(kinds) == 1, f"the README's plugin registers {kinds}, not one backend"
    return kinds[0]


@pytest.fixture
async def client(
    readme_plugin: ModuleType, llama_server: str, tiny_models: dict[str, Path]
) -> AsyncIterator[AsyncTestClient[Any]]:
    registry = load_backends(readme_plugin)
    config = parse_config(
        {
            "swapper": {"gpu_enabled": False, "model_swap_timeout": 30, "stop_timeout": 5},
            "models": {
                "my-model": {
                    "backend": kind_of(readme_plugin),
                    "command": [
                        llama_server,
                        "-m",
                        str(tiny_models["a"]),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "-c",
                        "512",
                        "-ngl",
                        "0",
                    ],
                }
            },
        },
        "readme.yaml",
        registry.schemas(),
    )
    async with AsyncTestClient(create_app(config, registry), timeout=30) as test_client:
        yield test_client


def test_readme_plugin_registers_its_backend(readme_plugin: ModuleType) -> None:
    registry = load_backends(readme_plugin)
    kind = kind_of(readme_plugin)
    assert "llamacpp" in registry.backends
    with pytest.raises(ConfigError, match=r"\$\.models\.m\.command: required key is missing"):
        parse_config({"models": {"m": {"backend": kind}}}, "x.yaml", registry.schemas())
    # The README's config example names the kind its plugin registers.
    section = (ROOT / "README.md").read_text().split("## Write your own backend", 1)[1]
    assert f"backend: {kind}\n" in section


async def test_readme_plugin_serves_a_chat(
    client: AsyncTestClient[Any], readme_plugin: ModuleType
) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"model": "my-model", "messages": MESSAGES, "max_tokens": 4}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    status = (await client.get("/status")).json()["models"]["my-model"]
    assert status["status"] == "LOADED" and status["backend"] == kind_of(readme_plugin)
    assert status["pid"] is not None
