"""Shared fixtures: a real llama-server binary, tiny GGUF models, swapper as a subprocess."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes import FakeWorld

ROOT = Path(__file__).resolve().parent.parent
#: Faithful fakes of backends that cannot run here (Ollama, vLLM) and of NVML.
FAKES = ROOT / "tests" / "fake_servers"


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
        built = subprocess.run(["bash", str(ROOT / "scripts/build-llama-server.sh")],
                               capture_output=True, text=True, check=False)
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
    return {name: module.write_tiny_model(folder / f"tiny-{name}.gguf", seed=seed, name=f"tiny-{name}")
            for seed, name in enumerate("abc")}


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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SwapperProcess:
    """``swapper serve`` as a real subprocess on a loopback port."""

    def __init__(self, config: dict[str, Any], workdir: Path, llama_server: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "swapper.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "swapper.log"
        # Learned VRAM sizes go to the test's own folder, never to the user's state file.
        env = {**os.environ, "SWAPPER_LLAMA_SERVER": llama_server, "PYTHONUNBUFFERED": "1",
               "XDG_STATE_HOME": str(workdir / "state"), **(extra_env or {})}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swapper", "serve", "--config", str(self.config_path),
             "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
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
        return wait_until(lambda: (m := self.model(model_id))["status"] == status and m,
                          timeout, f"{model_id} to be {status}")

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
def swapper_factory(tmp_path: Path, llama_server: str,
                    tiny_models: dict[str, Path]) -> Iterator[Any]:
    """Start swapper subprocesses on a config built from the tiny models; stop them after."""
    started: list[SwapperProcess] = []
    workdir = tmp_path / "run"
    workdir.mkdir()
    # Models are linked into the test's own folder so its backends can be told apart in /proc.
    for name, path in tiny_models.items():
        (workdir / path.name).symlink_to(path)

    def start(swapper: dict[str, Any] | None = None, models: dict[str, Any] | None = None,
              ctx_size: int = 512, timeouts: dict[str, Any] | None = None,
              env: dict[str, str] | None = None) -> SwapperProcess:
        config = {
            "swapper": {"mode": "single-active", "max_concurrent_models": 1,
                        "model_swap_timeout": 30, "gpu_enabled": False, "stop_timeout": 5,
                        "shutdown_timeout": 5, **(swapper or {})},
            "server": {"host": "127.0.0.1", "port": 1},
            "timeouts": timeouts or {},
            "models": models or {
                f"tiny-{name}": {"backend": "llamacpp", "model_path": str(workdir / f"tiny-{name}.gguf"),
                                 "ctx_size": ctx_size, "aliases": [name]}
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
