"""The plugin contract: discovery through entry points, contract checks, the llama.cpp command."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from swapper_llamacpp import LlamaCppBackend, LlamaCppModel

import swapper.backends
from swapper.backends import hookspecs
from swapper.backends.contract import Backend, BackendHandle, BackendSettings
from swapper.backends.registry import load_backends
from swapper.config import ModelEntry, parse_config
from swapper.errors import BackendError, ModelUnavailable, PluginError, SwapperError
from swapper.scheduling.coordinator import SwapCoordinator


def _hookspecs() -> set[str]:
    """Every hook swapper declares (functions its hookspec marker marked)."""
    return {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "swapper_spec")}


def _test_names() -> set[str]:
    """Every test function in tests/, by name."""
    names: set[str] = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        names |= {
            node.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        }
    return names


def test_every_hook_has_a_test() -> None:
    """Guard (as datasette's): each hookspec needs a test named ``test_hook_<name>``."""
    hooks = _hookspecs()
    assert hooks, "no hookspecs found: the guard would check nothing"
    untested = {hook for hook in hooks if f"test_hook_{hook}" not in _test_names()}
    assert not untested, f"hooks without a test_hook_<name> test: {sorted(untested)}"


def test_hook_register_backends() -> None:
    """A plugin's register_backends hook hands its Backend classes to swapper by kind."""
    registry = load_backends(_plugin(_Complete))
    assert registry.backends["complete"] is _Complete
    assert {"llamacpp", "ollama", "vllm"} <= set(registry.backends)  # built-ins, same hook


def test_builtin_backend_comes_through_the_entry_point_group() -> None:
    points = importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
    assert {(p.name, p.value) for p in points} >= {("llamacpp", "swapper_llamacpp")}
    registry = load_backends()
    assert registry.backends["llamacpp"] is LlamaCppBackend
    assert registry.sources["llamacpp"].startswith("swapper ")  # distribution and version
    assert registry.sources["llamacpp"].endswith("(swapper_llamacpp)")
    assert registry.schemas()["llamacpp"] is LlamaCppModel


def test_nothing_called_plugins_is_installed(tmp_path: Path) -> None:
    # Outside the repository, the installed environment has swapper_llamacpp but no `plugins`.
    probe = "import importlib.util as u; print(u.find_spec('plugins'), bool(u.find_spec('swapper_llamacpp')))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["None", "True"]


class _Entry(ModelEntry, frozen=True, kw_only=True):
    pass


def _plugin(cls: object) -> object:
    class Plugin:
        @hookspecs.hookimpl
        def register_backends(self, register: Callable[[Any], None]) -> None:
            register(cls)

    return Plugin()


class _Complete(Backend):
    name = "complete"
    entry_type = _Entry

    async def start(self) -> BackendHandle:
        return BackendHandle(base_url="http://127.0.0.1:1")

    async def ready(self, handle: BackendHandle) -> bool:
        return True

    async def stop(self, handle: BackendHandle) -> None:
        return None

    async def alive(self, handle: BackendHandle) -> bool:
        return True


class _NoStop(Backend):
    name = "nostop"
    entry_type = _Entry


class _NoName(_Complete):
    name = ""


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (object, "not a Backend subclass"),
        (_NoName, "has no `name`"),
        (_NoStop, "does not implement alive, ready, start, stop"),
        (type("_Llama2", (_Complete,), {"name": "llamacpp"}), "already registered by 'swapper "),
    ],
)
def test_contract_violations_name_the_plugin(cls: object, message: str) -> None:
    with pytest.raises(PluginError, match=message) as info:
        load_backends(_plugin(cls))
    assert "plugin '" in info.value.message


def test_a_complete_backend_registers() -> None:
    assert load_backends(_plugin(_Complete)).backends["complete"] is _Complete


def _llama(gpu: bool, **entry: Any) -> LlamaCppBackend:
    model = LlamaCppModel(backend="llamacpp", model_path="/m/x.gguf", **entry)
    return LlamaCppBackend("qwen", model, BackendSettings(gpu_enabled=gpu))


def test_llamacpp_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWAPPER_LLAMA_SERVER", raising=False)
    backend = _llama(True, ctx_size=8192, binary="/opt/llama-server", args=["--jinja", "-np", "2"])
    assert backend.command(4242) == [
        "/opt/llama-server",
        "-m",
        "/m/x.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "4242",
        "-c",
        "8192",
        "-ngl",
        "999",
        "--alias",
        "qwen",
        "--threads-http",
        "32",
        "--jinja",
        "-np",
        "2",
    ]
    assert backend.max_connections() == 31  # one thread stays free for health probes


def test_llamacpp_http_threads_from_the_entry_win() -> None:
    backend = _llama(True, args=["-tht", "8"])
    argv = backend.command(1)
    assert argv[-2:] == ["-tht", "8"]  # after swapper's default: llama-server takes the last
    assert backend.max_connections() == 7


def test_llamacpp_cpu_only_and_binary_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPPER_LLAMA_SERVER", "/env/llama-server")
    argv = _llama(False).command(1)
    assert argv[0] == "/env/llama-server"
    assert argv[argv.index("-ngl") + 1] == "0"
    assert "-c" not in argv


def test_logged_command_lines_hide_secrets() -> None:
    from swapper.backends.contract import redact_argv

    argv = ["llama-server", "--api-key", "s3cret", "--hf-token=tok", "-m", "x.gguf"]
    assert redact_argv(argv) == [
        "llama-server",
        "--api-key",
        "***",
        "--hf-token=***",
        "-m",
        "x.gguf",
    ]


def test_the_plugin_api_is_exported_from_swapper_backends() -> None:
    # Third-party plugins import these names from here (tests/plugins/swapper-example-backend).
    for name in ("Backend", "BackendError", "BackendHandle", "SubprocessBackend", "hookimpl"):
        assert name in swapper.backends.__all__ and hasattr(swapper.backends, name)
    assert swapper.backends.BackendError is BackendError
    assert issubclass(BackendError, SwapperError)


class _Typed(ModelEntry, frozen=True, kw_only=True):
    greeting: str
    #: What start raises: a plugin's BackendError, or the RuntimeError plugins raised before.
    error: str = "BackendError"


class _TypedBackend(Backend[_Typed]):
    """Reads its own entry's keys with no isinstance check: the class is generic over it."""

    name = "typed"
    entry_type = _Typed

    async def start(self) -> BackendHandle:
        error = BackendError if self.entry.error == "BackendError" else RuntimeError
        raise error(f"refused: {self.entry.greeting}")

    async def ready(self, handle: BackendHandle) -> bool:
        return True

    async def stop(self, handle: BackendHandle) -> None:
        return None

    async def alive(self, handle: BackendHandle) -> bool:
        return True


@pytest.mark.anyio
@pytest.mark.parametrize("error", ["BackendError", "RuntimeError"])
async def test_a_backend_error_fails_the_load_with_the_plugins_message(
    tmp_path: Path, error: str
) -> None:
    registry = load_backends(_plugin(_TypedBackend))
    config = parse_config(
        {
            "swapper": {"gpu_enabled": False, "state_file": str(tmp_path / "state.json")},
            "models": {"t": {"backend": "typed", "greeting": "no GPU for you", "error": error}},
        },
        "typed.yaml",
        registry.schemas(),
    )
    coordinator = SwapCoordinator(config, registry, None)
    try:
        with pytest.raises(ModelUnavailable) as info:
            await coordinator.acquire("t")
        # Reported as a RuntimeError always was: the plugin's message, no class name added.
        assert info.value.message.endswith(": refused: no GPU for you")
        assert info.value.code == "model_unavailable"
        assert coordinator.status().models["t"].last_error == "load failed: refused: no GPU for you"
    finally:
        await coordinator.close()


def test_the_documented_plugin_example_registers_and_builds_its_command(tmp_path: Path) -> None:
    docs = (Path(__file__).parent.parent / "docs" / "backends.md").read_text()
    section = docs.split("## Writing a backend plugin", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "docs/backends.md lost its plugin example"
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code.group(1), "docs/backends.md", "exec"), namespace)
    registry = load_backends(_plugin(namespace["MyBackend"]))
    config = parse_config(
        {"models": {"m": {"backend": "mine", "binary": "/bin/srv", "model_path": "/m.bin"}}},
        "docs.yaml",
        registry.schemas(),
    )
    backend = registry.backends["mine"]("m", config.models["m"], BackendSettings())
    assert backend.command(7) == ["/bin/srv", "--model", "/m.bin", "--port", "7"]
