"""A model entry's ``env`` reaches its backend process, on top of swapper's own environment."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from swapper_ollama import OllamaModel
from swapper_vllm import VllmBackend, VllmModel

from swapper.backends import BackendHandle, SubprocessBackend
from swapper.backends.contract import BackendSettings, child_environment
from swapper.config import ModelEntry
from tests.conftest import SwapperProcess, chat, tiny_model


def environ_of(pid: int) -> dict[str, str]:
    """A running process's environment, as the kernel holds it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.integration
def test_a_llamacpp_entrys_env_reaches_llama_server(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    workdir: Path = swapper_factory.workdir  # type: ignore[attr-defined]
    entry = tiny_model(workdir, env={"SWAPPER_ENV_PROBE": "from the entry", "LANG": "C.UTF-8"})
    swapper = swapper_factory(models={"m": entry}, env={"LANG": "en_US.UTF-8"})
    assert chat(swapper, "m").status_code == 200
    pid = swapper.model("m")["pid"]
    child = environ_of(pid)
    assert child["SWAPPER_ENV_PROBE"] == "from the entry"
    assert child["LANG"] == "C.UTF-8"  # the entry wins over what swapper inherited
    assert child["PATH"] == environ_of(swapper.proc.pid)["PATH"]  # the rest is inherited


class _PrintsEnv(ModelEntry, frozen=True, kw_only=True):
    pass


class _PrintsEnvBackend(SubprocessBackend[_PrintsEnv]):
    """A child that prints two variables and waits: a real process reporting its env."""

    name = "prints-env"
    entry_type = _PrintsEnv

    def command(self, port: int) -> list[str]:
        script = (
            "import os, sys, time\n"
            "print('probe=' + os.environ.get('SWAPPER_ENV_PROBE', '<unset>'), flush=True)\n"
            "print('token=' + os.environ.get('HF_TOKEN', '<unset>'), flush=True)\n"
            "time.sleep(60)\n"
        )
        return [sys.executable, "-c", script]

    async def ready(self, handle: BackendHandle) -> bool:
        return True


@pytest.mark.anyio
async def test_env_reaches_a_subprocess_backend_and_secret_values_are_masked() -> None:
    entry = _PrintsEnv(
        backend="prints-env", env={"SWAPPER_ENV_PROBE": "hello", "HF_TOKEN": "hf_s3cr3t"}
    )
    backend = _PrintsEnvBackend("p", entry, BackendSettings(stop_timeout=5))
    handle = await backend.start()
    assert handle.process is not None
    try:
        async with asyncio.timeout(30):  # each line sets output_seen: wait on it, no sleeping
            while len(handle.process.tail) < 2:
                handle.process.output_seen.clear()
                await handle.process.output_seen.wait()
        lines = list(handle.process.tail)
        assert "probe=hello" in lines
        assert "token=***" in lines  # HF_TOKEN's value is masked wherever the output goes
        assert not any("hf_s3cr3t" in line for line in lines)
    finally:
        await backend.stop(handle)
        await backend.aclose()


def test_no_env_keeps_the_plugins_own_environment() -> None:
    assert child_environment(None, {}) is None  # inherit swapper's, unchanged
    base = {"A": "1", "B": "2"}
    assert child_environment(base, {}) is base
    assert child_environment(base, {"B": "3", "C": "4"}) == {"A": "1", "B": "3", "C": "4"}
    merged = child_environment(None, {"SWAPPER_ENV_PROBE": "x"})
    assert merged is not None and merged["PATH"] == os.environ["PATH"]


def test_vllm_sleep_mode_env_and_the_entrys_env_both_reach_the_child() -> None:
    entry = VllmModel(backend="vllm", model="m", sleep_mode=True, env={"HF_HOME": "/cache"})
    backend = VllmBackend("v", entry, BackendSettings())
    env = child_environment(backend.environment(), entry.env)
    assert env is not None
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["HF_HOME"] == "/cache"


def test_ollama_env_needs_serve() -> None:
    with pytest.raises(ValueError, match="env: needs serve: true"):
        OllamaModel(backend="ollama", model="qwen3:8b", env={"OLLAMA_DEBUG": "1"})
    assert OllamaModel(backend="ollama", model="q", serve=True, env={"OLLAMA_DEBUG": "1"}).env
