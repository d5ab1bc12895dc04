"""The vLLM backend through a real swapper, in front of the faithful fake ``vllm serve``.

vLLM needs a GPU; ``tests/fake_servers/vllm`` is a real subprocess that behaves as docs/backends.md
says vLLM does: port closed while loading, ``/health``, sleep mode, and refusing to start while
the (fake) GPU lacks the free memory its ``--gpu-memory-utilization`` asks for. swapper sees the
fake GPU through a fake ``pynvml`` module put on its path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FAKES, SwapperProcess, wait_until
from tests.fake_servers import fakegpu

pytestmark = pytest.mark.integration

VLLM = str(FAKES / "vllm")


def vllm(model: str, **entry: Any) -> dict[str, Any]:
    return {"backend": "vllm", "model": model, "binary": VLLM, **entry}


def client(swapper: SwapperProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{swapper.url}/v1", api_key="unused", max_retries=0)


def chat(swapper: SwapperProcess, model: str, text: str = "hi") -> str:
    answer = client(swapper).chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}]
    )
    assert answer.model == model
    return answer.choices[0].message.content or ""


def gpu_env(tmp_path: Path, release_lag: float = 0.0) -> dict[str, str]:
    """A 16 GiB fake GPU, seen by swapper (fake pynvml) and the fake vLLMs alike."""
    directory = tmp_path / "gpu"
    fakegpu.setup(directory, total_mb=16384, release_lag=release_lag)
    return {
        "SWAPPER_FAKE_GPU_DIR": str(directory),
        "PYTHONPATH": str(FAKES / "nvml"),
        "FAKE_VLLM_LOAD_SECONDS": "0.3",
    }


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_a_chat_through_vllm_under_its_served_name(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    swapper = swapper_factory(
        models={
            "qwen": vllm(
                "Qwen/Qwen3-8B",
                served_model_name="Qwen/Qwen3-8B-AWQ",
                gpu_memory_utilization=0.5,
                max_model_len=8192,
            )
        },
        env={"FAKE_VLLM_LOAD_SECONDS": "0.5"},
    )  # the port stays closed meanwhile
    assert chat(swapper, "qwen") == "vllm Qwen/Qwen3-8B-AWQ says: hi"
    status = swapper.model("qwen")
    argv = cmdline(status["pid"])
    assert argv[-12:] == [
        "serve",
        "Qwen/Qwen3-8B",
        "--host",
        "127.0.0.1",
        "--port",
        str(status["port"]),
        "--served-model-name",
        "Qwen/Qwen3-8B-AWQ",
        "--gpu-memory-utilization",
        "0.5",
        "--max-model-len",
        "8192",
    ]
    chunks = list(
        client(swapper).chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "one two"}], stream=True
        )
    )
    assert {c.model for c in chunks} == {"qwen"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "vllm Qwen/Qwen3-8B-AWQ says: one two"
    )


def test_old_vllms_flat_errors_become_openai_errors(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    # The entry's own args come last and win: vLLM then serves another name than swapper
    # sends, and answers 404 in the old flat shape.
    swapper = swapper_factory(
        models={"qwen": vllm("Qwen/Qwen3-8B", args=["--served-model-name", "other"])},
        env={"FAKE_VLLM_FLAT_ERRORS": "1", "FAKE_VLLM_LOAD_SECONDS": "0.1"},
    )
    response = swapper.http.post(
        "/v1/chat/completions",
        json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["message"] == "The model `qwen` does not exist."
    assert set(error) == {"message", "type", "param", "code"}


def test_sleep_mode_unloads_by_sleeping_and_loads_by_waking(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    swapper = swapper_factory(
        models={
            "a": vllm("org/a", gpu_memory_utilization=0.4, sleep_mode=True),
            "b": vllm("org/b", gpu_memory_utilization=0.4),
        },
        env=gpu_env(tmp_path),
    )
    chat(swapper, "a")
    pid = swapper.model("a")["pid"]
    assert "--enable-sleep-mode" in cmdline(pid)
    chat(swapper, "b")
    asleep = swapper.model("a")
    assert asleep["status"] == "SLEEPING" and asleep["pid"] == pid
    a_url = f"http://127.0.0.1:{asleep['port']}"
    assert httpx.get(f"{a_url}/is_sleeping").json() == {"is_sleeping": True}
    assert asleep["vram_mb"] == pytest.approx(1024, abs=1)  # the CUDA context stays
    chat(swapper, "a")
    awake = swapper.model("a")
    assert awake["status"] == "LOADED" and awake["pid"] == pid  # woken, not restarted
    assert httpx.get(f"{a_url}/is_sleeping").json() == {"is_sleeping": False}
    assert swapper.model("b")["status"] == "UNLOADED"  # b cannot sleep: stopped
    # An operator's unload puts it to sleep; a second one stops the process.
    assert swapper.http.post("/models/a/unload").status_code == 200
    assert swapper.model("a")["status"] == "SLEEPING"
    assert swapper.http.post("/models/a/unload").status_code == 200
    assert swapper.model("a")["status"] == "UNLOADED"


def test_vllm_starts_only_once_the_gpu_shows_the_previous_memory_free(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    # Each takes 0.6 of the GPU; a stopped one's memory shows free only a second later. Started
    # at once, b would find too little free memory and exit, as vLLM does.
    swapper = swapper_factory(
        models={
            "a": vllm("org/a", gpu_memory_utilization=0.6),
            "b": vllm("org/b", gpu_memory_utilization=0.6),
        },
        env=gpu_env(tmp_path, release_lag=1.0),
    )
    chat(swapper, "a")
    assert wait_until(lambda: swapper.model("a")["vram_mb"], 10, "a's VRAM") == pytest.approx(
        0.6 * 16384, abs=1
    )
    assert chat(swapper, "b") == "vllm b says: hi"
    waited = [line for line in swapper.output().splitlines() if "for GPU memory" in line]
    assert waited and "b: waited" in waited[0]
    # b started once, after the memory was back: vLLM's refusal is nowhere in b's output.
    lines = swapper.http.get("/models/b/logs", params={"lines": 1000}).json()["lines"]
    assert any("Application startup complete" in line for line in lines)  # the log is b's
    assert not any("Free memory on device" in line for line in lines)


def test_an_evicted_models_stream_past_drain_timeout_ends_with_a_clear_error(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    swapper = swapper_factory(
        swapper={"mode": "multi-active", "max_concurrent_models": 1, "drain_timeout": 0.5},
        models={"a": vllm("org/a"), "b": vllm("org/b")},
        env={"FAKE_VLLM_TOKEN_DELAY": "0.2", "FAKE_VLLM_LOAD_SECONDS": "0.1"},
    )
    long_text = " ".join(["word"] * 100)  # 20 s of tokens
    with httpx.Client(base_url=swapper.url, timeout=30) as http:
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "a",
                "stream": True,
                "messages": [{"role": "user", "content": long_text}],
            },
        ) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            # b arrives: a must go, and its stream is cut off after drain_timeout.
            assert chat(swapper, "b") == "vllm b says: hi"
            rest = [line for line in lines if line.startswith("data:")]
    assert rest, "the stream ended without a final event"
    assert "make room for 'b'" in rest[-1] and "drain_timeout" in rest[-1]
    assert swapper.model("a")["status"] == "UNLOADED"


def test_multi_active_evicts_by_the_vram_budget_as_the_fake_gpu_measures(
    swapper_factory: Callable[..., SwapperProcess],
    tmp_path: Path,
) -> None:
    # Three slots, but 0.3 of 16 GiB each (4915 MiB) under a 12000 MiB budget: two fit.
    swapper = swapper_factory(
        swapper={"mode": "multi-active", "max_concurrent_models": 3, "vram_budget_mb": 12000},
        models={m: vllm(f"org/{m}", gpu_memory_utilization=0.3) for m in "abc"},
        env=gpu_env(tmp_path, release_lag=0.5),
    )
    chat(swapper, "a")
    chat(swapper, "b")
    assert swapper.status()["resident"] == ["a", "b"]
    chat(swapper, "a")  # b is now the least recently used
    assert chat(swapper, "c") == "vllm c says: hi"
    doc = swapper.status()
    assert {m: doc["models"][m]["status"] for m in "abc"} == {
        "a": "LOADED",
        "b": "UNLOADED",
        "c": "LOADED",
    }
    assert doc["gpu"]["gpus"][0]["used_mb"] == pytest.approx(2 * 0.3 * 16384, abs=2)
    # c's size is measured just after it serves: wait for the measurement, not for the reply.
    learned = wait_until(
        lambda: (
            len(swapper.status()["vram"]["learned_mb"]) == 3
            and swapper.status()["vram"]["learned_mb"]
        ),
        10,
        "c's size learned",
    )
    assert learned == {m: pytest.approx(0.3 * 16384, abs=1) for m in "abc"}


def test_an_alias_reaches_vllm_under_its_served_name(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    # vLLM refuses any name but the one it serves; an alias must be rewritten to it.
    swapper = swapper_factory(
        models={"qwen": {**vllm("Qwen/Qwen3-8B"), "aliases": ["gpt-4o"]}},
        env={"FAKE_VLLM_LOAD_SECONDS": "0.1"},
    )
    answer = client(swapper).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "vllm qwen says: hi"
    assert answer.model == "qwen"
