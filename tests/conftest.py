"""Shared fixtures: a real llama-server binary, tiny GGUF models, swapper as a subprocess,
and swapper's coordinator and app in-process on fake backends."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import respx
import yaml
from litestar.testing import AsyncTestClient

from swapper.backends.registry import BackendRegistry, load_backends
from swapper.config import Config, parse_config
from swapper.http.app import create_app
from swapper.scheduling.coordinator import SwapCoordinator
from tests.fakes import FakeGpu, FakePlugin, FakeWorld

ROOT = Path(__file__).resolve().parent.parent
#: Faithful fakes of backends that cannot run here (Ollama, vLLM) and of NVML.
FAKES = ROOT / "tests" / "fake_servers"

#: Multiplies the few absolute time bounds the tests keep where a promise is stated in seconds
#: ("closes within a second"). 1 holds on a 2-core machine with one core busy; a slower machine,
#: or one under heavier load, sets SWAPPER_TEST_SLOWNESS (see the README's Tests section).
SLOWNESS = float(os.environ.get("SWAPPER_TEST_SLOWNESS", "1"))


def seconds(value: float) -> float:
    """An absolute time bound, scaled by :data:`SLOWNESS`."""
    return value * SLOWNESS


#: The conversation most tests send: short, so tiny models answer fast.
MESSAGES = [{"role": "user", "content": "hi"}]
#: What respx answers for a fake backend's chat completion.
REPLY = {
    "id": "x",
    "object": "chat.completion",
    "created": 1,
    "model": "a",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, as swapper does."""
    return "asyncio"


@pytest.fixture
def world() -> FakeWorld:
    """The shared state of this test's fake backends."""
    return FakeWorld()


@pytest.fixture(scope="session")
def llama_server() -> str:
    """The llama-server binary: $SWAPPER_LLAMA_SERVER, else built once and cached."""
    binary = os.environ.get("SWAPPER_LLAMA_SERVER")
    if not binary:
        built = subprocess.run(
            ["bash", str(ROOT / "scripts/build-llama-server.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            pytest.fail(f"could not build llama-server:\n{built.stderr[-3000:]}")
        binary = built.stdout.strip().splitlines()[-1]
    if not os.access(binary, os.X_OK):
        pytest.fail(f"llama-server not executable: {binary}")
    return binary


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny random-weight GGUF models, generated for this test run."""
    spec = importlib.util.spec_from_file_location("tiny_gguf", ROOT / "scripts/tiny_gguf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("models")
    return {
        name: module.write_tiny_model(folder / f"tiny-{name}.gguf", seed=seed, name=f"tiny-{name}")
        for seed, name in enumerate("abc")
    }


def process_state(pid: int) -> str | None:
    """The state letter of a live process, or None when it is gone (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state in ("Z", "X") else state


def processes_with(marker: str) -> list[int]:
    """Live pids whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and process_state(int(entry.name)) is not None:
            pids.append(int(entry.name))
    return pids


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def chat(swapper: SwapperProcess, model: str, **extra: Any) -> httpx.Response:
    """One short non-stream chat completion through a swapper subprocess."""
    return swapper.http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 2, **extra},
    )


def sdk(swapper: SwapperProcess, **options: Any) -> openai.OpenAI:
    """The official OpenAI SDK pointed at a swapper subprocess (no retries: each call counts)."""
    return openai.OpenAI(
        base_url=f"{swapper.url}/v1",
        api_key=options.pop("api_key", "none"),
        max_retries=0,
        **options,
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SwapperProcess:
    """``swapper serve`` as a real subprocess on a loopback port."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        llama_server: str,
        extra_env: dict[str, str] | None = None,
        port: int | None = None,  # (added for tests/test_peers.py: peers name each other's port)
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "swapper.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "swapper.log"
        # Learned VRAM sizes go to the test's own folder, never to the user's state file.
        env = {
            **os.environ,
            "SWAPPER_LLAMA_SERVER": llama_server,
            "PYTHONUNBUFFERED": "1",
            "XDG_STATE_HOME": str(workdir / "state"),
            **(extra_env or {}),
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swapper",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)
        try:
            wait_until(self._healthy, 30, "swapper to answer /health")
        except AssertionError:
            self.stop()
            raise AssertionError(f"swapper did not start; its output:\n{self.output()}") from None

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"swapper exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return self.http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        response = self.http.get("/status")
        assert response.status_code == 200
        return response.json()  # type: ignore[no-any-return]

    def model(self, model_id: str) -> dict[str, Any]:
        return self.status()["models"][model_id]  # type: ignore[no-any-return]

    def wait_status(self, model_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
        return wait_until(
            lambda: (m := self.model(model_id))["status"] == status and m,
            timeout,
            f"{model_id} to be {status}",
        )

    def backends(self) -> list[int]:
        """llama-server processes serving this swapper's models."""
        return processes_with(f"-m {self.workdir}/")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """terminate → wait → kill; then make sure no backend outlives it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log.close()
        for pid in self.backends():  # a stray would be a bug; the tests assert on it
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def swapper_factory(
    tmp_path: Path, llama_server: str, tiny_models: dict[str, Path]
) -> Iterator[Any]:
    """Start swapper subprocesses on a config built from the tiny models; stop them after."""
    started: list[SwapperProcess] = []
    workdir = tmp_path / "run"
    workdir.mkdir()
    # Models are linked into the test's own folder so its backends can be told apart in /proc.
    for path in tiny_models.values():
        (workdir / path.name).symlink_to(path)

    def start(
        swapper: dict[str, Any] | None = None,
        models: dict[str, Any] | None = None,
        ctx_size: int = 512,
        timeouts: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        server: dict[str, Any] | None = None,
    ) -> SwapperProcess:
        config = {
            "swapper": {
                "mode": "single-active",
                "max_concurrent_models": 1,
                "model_swap_timeout": 30,
                "gpu_enabled": False,
                "stop_timeout": 5,
                "shutdown_timeout": 5,
                **(swapper or {}),
            },
            "server": {"host": "127.0.0.1", "port": 1, **(server or {})},
            "timeouts": timeouts or {},
            "models": models
            or {
                f"tiny-{name}": {
                    "backend": "llamacpp",
                    "model_path": str(workdir / f"tiny-{name}.gguf"),
                    "ctx_size": ctx_size,
                    "aliases": [name],
                }
                for name in "abc"
            },
        }
        process = SwapperProcess(config, workdir, llama_server, env)
        started.append(process)
        return process

    start.workdir = workdir  # type: ignore[attr-defined]
    yield start
    for process in started:
        process.stop()


def tiny_model(workdir: Path, name: str = "a", **entry: Any) -> dict[str, Any]:
    """A llamacpp entry for one of the tiny models linked into ``workdir``."""
    return {"backend": "llamacpp", "model_path": str(workdir / f"tiny-{name}.gguf"), **entry}


# -- in-process, on fake backends ---------------------------------------------------------------

#: The models fake-backend tests use unless they name their own: ``a`` (alias ``alpha``), b, c.
FAKE_MODELS: dict[str, dict[str, Any]] = {"a": {"aliases": ["alpha"]}, "b": {}, "c": {}}


def fake_config(
    world: FakeWorld,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    swapper: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    name: str = "test.yaml",
) -> tuple[Config, BackendRegistry]:
    """A config of ``backend: fake`` models (short timeouts), and the registry that knows them."""
    registry = load_backends(FakePlugin(world))
    data = {
        "swapper": {"model_swap_timeout": 5, "stop_timeout": 1, **(swapper or {})},
        "server": server or {},
        "models": {
            mid: {"backend": "fake", **entry}
            for mid, entry in (FAKE_MODELS if models is None else models).items()
        },
    }
    return parse_config(data, name, registry.schemas()), registry


CoordinatorFactory = Callable[..., SwapCoordinator]


@pytest.fixture
async def coordinator_factory(
    world: FakeWorld, tmp_path: Path
) -> AsyncIterator[CoordinatorFactory]:
    """Build coordinators on fake backends (and, with ``gpu=True``, a fake GPU of ``total_mb``);
    every one is closed after the test, and no fake may outlive it."""
    made: list[SwapCoordinator] = []

    def factory(
        models: dict[str, dict[str, Any]] | None = None,
        *,
        gpu: bool = False,
        total_mb: float = 16384.0,
        **swapper: Any,
    ) -> SwapCoordinator:
        settings = {"state_file": str(tmp_path / "state.json"), **swapper}
        config, registry = fake_config(world, models, swapper=settings)
        made.append(SwapCoordinator(config, registry, FakeGpu(world, total_mb) if gpu else None))
        return made[-1]

    yield factory
    for coordinator in made:
        await coordinator.close()
    assert world.alive == set(), "a fake backend outlived the coordinator"


FakeApp = Callable[..., contextlib.AbstractAsyncContextManager[AsyncTestClient[Any]]]


@pytest.fixture
def fake_app(world: FakeWorld) -> FakeApp:
    """swapper's whole app in-process on fake backends, as an ``async with`` test client.

    With ``reply`` (default: :data:`REPLY`) respx answers every fake backend's chat completions
    with it; ``reply=None`` leaves the upstream to the test's own respx router.
    """

    @contextlib.asynccontextmanager
    async def factory(
        models: dict[str, dict[str, Any]] | None = None,
        *,
        swapper: dict[str, Any] | None = None,
        server: dict[str, Any] | None = None,
        reply: dict[str, Any] | None = REPLY,
    ) -> AsyncIterator[AsyncTestClient[Any]]:
        config, registry = fake_config(world, models, swapper=swapper, server=server)
        with contextlib.ExitStack() as stack:
            if reply is not None:
                router = stack.enter_context(respx.mock(assert_all_called=False))
                for model_id in config.models:
                    router.post(f"http://{model_id}.fake.test/v1/chat/completions").respond(
                        json=reply
                    )
            async with AsyncTestClient(create_app(config, registry)) as client:
                yield client
        assert world.alive == set(), "a fake backend outlived the app"

    return factory


@contextlib.contextmanager
def served_in_thread(app: Any) -> Iterator[str]:
    """An ASGI app under a real uvicorn on a loopback port, in a thread of this process; its URL.

    For in-process tests that need a real server (the test client runs requests one at a time)
    or a browser. The server is stopped, lifespan included, when the block ends.
    """
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "the in-process server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
