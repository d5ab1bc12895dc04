"""vLLM on a GPU as swapper meets it in a container: host PIDs in NVML, the start gate, the
memory a sleeping vLLM keeps, sleep level 2, and the EngineCore child process.

All through a real swapper subprocess in front of the fake ``vllm serve`` on the fake GPU,
which swapper reads through the fake ``pynvml``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swapper.backends.registry import load_backends
from swapper.config import load_config
from swapper.errors import ConfigError
from tests.conftest import (
    FAKES,
    SwapperProcess,
    process_state,
    processes_with,
    wait_until,
)
from tests.test_vllm import chat, gpu_env, vllm

pytestmark = pytest.mark.integration

GPU_MB = 16384
#: What NVML adds to every pid in a container without ``pid: host`` (none is then ours).
HOST_PIDS = {"FAKE_NVML_PID_OFFSET": "4000000"}
NO_PROCESS_OF_OURS = "NVML reports no process of ours"


def learned(swapper: SwapperProcess, model: str) -> float:
    """Wait for ``model``'s size to be learned (it is measured just after the load)."""
    return float(
        wait_until(
            lambda: swapper.status()["vram"]["learned_mb"].get(model), 10, f"{model}'s size learned"
        )
    )


def state_file(swapper_factory: Any) -> dict[str, Any]:
    path = Path(swapper_factory.workdir) / "state" / "swapper" / "state.json"
    return json.loads(path.read_text())["models"]


def test_sizes_are_learned_from_used_memory_when_nvml_reports_host_pids(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    swapper = swapper_factory(
        models={
            "a": vllm("org/a", gpu_memory_utilization=0.4),
            "b": vllm("org/b", gpu_memory_utilization=0.25),
        },
        env={**gpu_env(tmp_path), **HOST_PIDS},
    )
    chat(swapper, "a")
    assert learned(swapper, "a") == pytest.approx(0.4 * GPU_MB, abs=1)
    chat(swapper, "b")  # a is stopped first: b's size is b's alone
    assert learned(swapper, "b") == pytest.approx(0.25 * GPU_MB, abs=1)
    saved = state_file(swapper_factory)
    assert {m: saved[m]["vram_mb"] for m in "ab"} == {
        "a": pytest.approx(0.4 * GPU_MB, abs=1),
        "b": pytest.approx(0.25 * GPU_MB, abs=1),
    }
    assert swapper.output().count(NO_PROCESS_OF_OURS) == 1


@pytest.mark.parametrize("pids", ["ours", "host"])
def test_a_sleeping_vllm_is_charged_what_it_still_holds(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
    pids: str,
) -> None:
    # Real vLLMs keep GBs asleep, more than the 1024 MiB assumed until measured.
    swapper = swapper_factory(
        models={
            "a": vllm("org/a", gpu_memory_utilization=0.4, sleep_mode=True),
            "b": vllm("org/b", gpu_memory_utilization=0.3),
        },
        env={
            **gpu_env(tmp_path),
            "FAKE_VLLM_SLEEP_RESIDUAL_MB": "3000",
            **(HOST_PIDS if pids == "host" else {}),
        },
    )
    chat(swapper, "a")
    learned(swapper, "a")
    chat(swapper, "b")
    asleep = swapper.model("a")
    assert asleep["status"] == "SLEEPING"
    assert asleep["vram_mb"] == pytest.approx(3000, abs=1)
    learned(swapper, "b")
    assert swapper.status()["vram"]["committed_mb"] == pytest.approx(3000 + 0.3 * GPU_MB, abs=2)


def test_sleep_level_2_wakes_with_the_weights_reloaded(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    swapper = swapper_factory(
        models={
            "a": vllm("org/a", gpu_memory_utilization=0.4, sleep_mode=True, sleep_level=2),
            "b": vllm("org/b", gpu_memory_utilization=0.4),
        },
        env=gpu_env(tmp_path),
    )
    assert chat(swapper, "a") == "vllm a says: hi"
    pid = swapper.model("a")["pid"]
    chat(swapper, "b")
    assert swapper.model("a")["status"] == "SLEEPING"
    # Level 2 dropped the weights; a plain /wake_up would now answer garbage.
    assert chat(swapper, "a", "hello") == "vllm a says: hello"
    assert swapper.model("a")["pid"] == pid  # woken, not restarted
    lines = swapper.http.get("/models/a/logs", params={"lines": 1000}).json()["lines"]
    assert any("sleep the engine with level 2" in line for line in lines)
    assert any("reloaded the weights" in line for line in lines)


def test_sleep_level_2_needs_sleep_mode(tmp_path: Path) -> None:
    path = tmp_path / "swapper.yaml"
    path.write_text("models:\n  x: {backend: vllm, model: m, sleep_level: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, load_backends().schemas())
    assert "$.models.x.sleep_level: needs sleep_mode: true" in info.value.message


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Callable[[float], subprocess.Popen[str]]]:
    """Start processes that hold fake-GPU memory (another user of the GPU); stopped after."""
    started: list[subprocess.Popen[str]] = []

    def start(mb: float) -> subprocess.Popen[str]:
        code = (
            f"import sys, time; sys.path.insert(0, {str(FAKES)!r}); import fakegpu; "
            f"fakegpu.hold({mb}); print('held', flush=True); time.sleep(600)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={"SWAPPER_FAKE_GPU_DIR": str(tmp_path / "gpu")},
        )
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_vllm_starts_once_its_utilization_share_is_free_not_just_its_size(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
    holder: Callable[[float], subprocess.Popen[str]],
) -> None:
    # b is small (vram_mb 2000) but vLLM reserves 0.6 of the GPU and exits unless that is free.
    env = gpu_env(tmp_path)
    swapper = swapper_factory(
        swapper={"vram_release_timeout": 60},
        models={"b": vllm("org/b", gpu_memory_utilization=0.6, vram_mb=2000)},
        env=env,
    )
    other = holder(10000)  # 6384 MiB free: enough for 2000, not for 0.6 x 16384
    answers: list[str] = []

    def ask() -> None:
        try:
            answers.append(chat(swapper, "b"))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            answers.append(repr(exc))

    request = threading.Thread(target=ask)
    request.start()
    wait_until(
        lambda: "b: waiting up to 60s for free VRAM" in swapper.output(),
        20,
        "swapper to wait for vLLM's share of the GPU",
    )
    other.kill()
    other.wait()
    request.join(30)
    assert answers == ["vllm b says: hi"]
    lines = swapper.http.get("/models/b/logs", params={"lines": 1000}).json()["lines"]
    assert not any("Free memory on device" in line for line in lines)  # started once, and fine


def test_the_engine_core_child_goes_with_vllm_on_unload_and_on_shutdown(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    # A slow graceful shutdown (past stop_timeout), and the EngineCore child holding the memory.
    model = f"org/{tmp_path.name}"
    swapper = swapper_factory(
        swapper={"stop_timeout": 1},
        models={"a": vllm(model, gpu_memory_utilization=0.3)},
        env={
            **gpu_env(tmp_path),
            "FAKE_VLLM_SHUTDOWN_SECONDS": "60",
            "FAKE_VLLM_CORE_HOLDS_MEMORY": "1",
        },
    )
    marker = f"VLLM::EngineCore {model}"
    try:
        chat(swapper, "a")
        cores = processes_with(marker)
        assert len(cores) == 1
        # The child holds the memory; swapper measures the whole process tree.
        assert learned(swapper, "a") == pytest.approx(0.3 * GPU_MB, abs=1)
        assert swapper.http.post("/models/a/unload").status_code == 200
        assert swapper.model("a")["status"] == "UNLOADED"
        assert process_state(cores[0]) is None
        chat(swapper, "a")
        cores = processes_with(marker)
        assert len(cores) == 1
        swapper.signal(signal.SIGTERM)
        swapper.proc.wait(timeout=30)
        assert process_state(cores[0]) is None
    finally:
        for pid in processes_with(marker):  # only when the test failed
            os.kill(pid, signal.SIGKILL)
