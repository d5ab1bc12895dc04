"""The fake backends of tests/fake_servers/ behave as docs/backends.md says the real ones do.

Each fake runs as a real subprocess on a free loopback port; every wait polls with a deadline.
The fake ``pynvml`` is only ever imported inside subprocesses, never by this test process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAKES, free_port, wait_until
from tests.fake_servers import fakegpu

MIB = 1024 * 1024

# A process that holds fake-GPU memory until killed: argv[1] = fake_servers dir, argv[2] = MiB.
HOLDER = (
    "import sys, time; sys.path.insert(0, sys.argv[1]); import fakegpu; "
    "fakegpu.hold(float(sys.argv[2])); time.sleep(120)"
)


def status_of(url: str, **kwargs: Any) -> int | None:
    """HTTP status of a GET, or None while nothing listens."""
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code
    except httpx.TransportError:
        return None


class Spawner:
    """Starts fake servers and helper processes; stops every one of them in teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def env(self, extra: dict[str, str] | None) -> dict[str, str]:
        # The fakes read many variables: start from a clean slate so the outer environment can't leak in.
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FAKE_", "OLLAMA_", "VLLM_"))
            and k not in (fakegpu.ENV, "PYTHONPATH")
        }
        return {**base, **(extra or {})}

    def start(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.tmp / f"proc-{len(self.children)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(env),
            )
        self.children.append(proc)
        self.logs[proc.pid] = log
        return proc

    def fake(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(str(FAKES / name), *args, env=env)

    def run(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=20,
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.stop_all()


@pytest.fixture
def gpu_dir(tmp_path: Path) -> Path:
    """A 16 GiB fake GPU whose dead holders' memory comes back after 0.5 s."""
    directory = tmp_path / "gpu"
    fakegpu.setup(directory, total_mb=16384, release_lag=0.5)
    return directory


def hold_in_child(procs: Spawner, gpu_dir: Path, mb: float) -> subprocess.Popen[bytes]:
    holder = procs.start("-c", HOLDER, str(FAKES), str(mb), env={fakegpu.ENV: str(gpu_dir)})
    wait_until(
        lambda: holder.pid in fakegpu.snapshot(gpu_dir).processes, 10, what="the holder's memory"
    )
    return holder


def sse_data(response: httpx.Response) -> list[str]:
    """The payloads of a stream's ``data:`` events, in order."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def chat_stream(client: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed chat with usage, checked to be SSE ending in ``[DONE]``."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_data(response)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def stop_gracefully(procs: Spawner, proc: subprocess.Popen[bytes], marker: str) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=3) == 0
    assert marker in procs.log(proc)


# --- fake GPU -----------------------------------------------------------------------------------


def test_fakegpu_counts_holders_and_lags_release_of_dead_ones(
    procs: Spawner, gpu_dir: Path
) -> None:
    holder = hold_in_child(procs, gpu_dir, 3000)
    snap = fakegpu.snapshot(gpu_dir)
    assert (snap.name, snap.total_mb, snap.used_mb, snap.free_mb) == (
        "Fake GPU",
        16384,
        3000,
        13384,
    )
    assert snap.processes == {holder.pid: 3000}

    # A live process's hold changes at once, 0 included.
    fakegpu.hold(1000, gpu_dir)
    assert fakegpu.snapshot(gpu_dir).used_mb == 4000
    fakegpu.hold(0, gpu_dir)
    assert fakegpu.snapshot(gpu_dir).used_mb == 3000

    holder.kill()
    holder.wait()
    before = time.monotonic()
    snap = fakegpu.snapshot(gpu_dir)  # the first observer of the death starts the release clock
    after = time.monotonic()
    assert holder.pid not in snap.processes
    assert snap.used_mb == 3000, "a dead holder's memory must still count during release_lag"
    # The clock started between `before` and `after`. Until before + lag the memory still
    # counts; from after + lag on it is free. Both are read off the clock itself, so no bound
    # depends on how fast this machine is (time is what is being tested: sleeping is the test).
    lag = 0.5
    while (now := time.monotonic()) < before + lag:
        if fakegpu.snapshot(gpu_dir).used_mb != 3000 and time.monotonic() < before + lag:
            raise AssertionError(f"released {now - before:.3f}s after the death, before the lag")
        time.sleep(0.02)
    time.sleep(max(0.0, after + lag - time.monotonic()))
    assert fakegpu.snapshot(gpu_dir).used_mb == 0, "still held after release_lag"
    assert not list((gpu_dir / "procs").glob("*.json"))


def test_fake_pynvml_reports_the_fake_gpu_in_bytes(procs: Spawner, gpu_dir: Path) -> None:
    holder = hold_in_child(procs, gpu_dir, 2048)
    script = """if True:
        import json, pynvml
        out = {"module": pynvml.__file__}
        try:
            pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError_Uninitialized:
            out["uninitialized"] = True
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        out.update(count=pynvml.nvmlDeviceGetCount(), name=pynvml.nvmlDeviceGetName(handle),
                   total=memory.total, used=memory.used, free=memory.free,
                   procs=[[p.pid, p.usedGpuMemory]
                          for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)])
        pynvml.nvmlShutdown()
        print(json.dumps(out))
    """
    nvml_path = str(FAKES / "nvml")
    done = procs.run("-c", script, env={"PYTHONPATH": nvml_path, fakegpu.ENV: str(gpu_dir)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out["module"]).parent == FAKES / "nvml"
    assert out["uninitialized"] is True
    assert (out["count"], out["name"]) == (1, "Fake GPU")
    assert (out["total"], out["used"], out["free"]) == (
        16384 * MIB,
        2048 * MIB,
        (16384 - 2048) * MIB,
    )
    assert out["procs"] == [[holder.pid, 2048 * MIB]]

    no_gpu = """if True:
        import pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            print(type(exc).__name__, isinstance(exc, pynvml.NVMLError_LibraryNotFound))
    """
    done = procs.run("-c", no_gpu, env={"PYTHONPATH": nvml_path})
    assert done.stdout.split() == ["NVMLError_LibraryNotFound", "True"], done.stderr


# --- vLLM ---------------------------------------------------------------------------------------


def test_vllm_port_closed_while_loading_then_serves_openai(procs: Spawner) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = procs.fake(
        "vllm",
        "serve",
        "org/model-a",
        "--host",
        "127.0.0.1",
        f"--port={port}",
        "--served-model-name",
        "alpha",
        "--max-model-len",
        "2048",
        env={"FAKE_VLLM_LOAD_SECONDS": "3"},
    )
    wait_until(lambda: "Starting to load model" in procs.log(proc), 10, what="the load to begin")
    # The load takes 3 s from the line just seen: a generous window to find the port closed,
    # even with every core busy.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=2)
    wait_until(lambda: status_of(f"{base}/health") == 200, 20, what="/health 200")
    assert time.monotonic() - started >= 3
    assert "Application startup complete" in procs.log(proc)

    with httpx.Client(base_url=base, timeout=5) as client:
        listed = client.get("/v1/models").json()
        assert listed["object"] == "list"
        [entry] = listed["data"]
        assert {k: entry[k] for k in ("id", "object", "owned_by", "root", "max_model_len")} == {
            "id": "alpha",
            "object": "model",
            "owned_by": "vllm",
            "root": "org/model-a",
            "max_model_len": 2048,
        }
        assert isinstance(entry["created"], int)

        chat = {
            "model": "alpha",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello world"},
            ],
        }
        reply = client.post("/v1/chat/completions", json=chat)
        assert reply.headers["content-type"].startswith("application/json")
        body = reply.json()
        assert (body["object"], body["model"]) == ("chat.completion", "alpha")
        assert body["choices"][0]["message"] == {
            "role": "assistant",
            "content": "vllm alpha says: hello world",
            "tool_calls": [],
        }
        assert body["choices"][0]["finish_reason"] == "stop"

        text = client.post("/v1/completions", json={"model": "alpha", "prompt": "once"}).json()
        assert text["choices"][0]["text"] == "vllm alpha says: once"

        # The model path is not the served name: vLLM answers 404 in the nested OpenAI style.
        missing = client.post("/v1/chat/completions", json={**chat, "model": "org/model-a"})
        assert missing.status_code == 404
        assert missing.json() == {
            "error": {
                "message": "The model `org/model-a` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
        bad = client.post(
            "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == 400
        assert client.post("/sleep").status_code == 404, (
            "sleep endpoints need VLLM_SERVER_DEV_MODE=1"
        )

        chunks = chat_stream(client, chat)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "alpha" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert "".join(contents) == "vllm alpha says: hello world" and len(contents) == 5
    assert (
        chunks[-2]["choices"][0]["delta"] == {}
        and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    stop_gracefully(procs, proc, "Shutting down")


def test_vllm_test_knobs_count_connections_and_drop_a_reused_one(procs: Spawner) -> None:
    """The fake's own test knobs (not vLLM's): /fake/stats counts, DROP_IDLE=0 drops reuse."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.fake(
        "vllm",
        "serve",
        "org/m",
        "--host",
        "127.0.0.1",
        f"--port={port}",
        env={"FAKE_VLLM_STATS": "1", "FAKE_VLLM_DROP_IDLE": "0"},
    )
    wait_until(lambda: status_of(f"{base}/health") == 200, 20, what="/health 200")
    body = {"model": "org/m", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=base, timeout=5) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        # The same kept-alive connection again: the fake reads it and hangs up unanswered.
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/v1/chat/completions", json=body)
    stats = httpx.get(f"{base}/fake/stats", timeout=5).json()
    assert (stats["served"], stats["dropped"], stats["max_in_flight"]) == (1, 1, 1)
    assert stats["max_connections"] == 1 and stats["in_flight"] == 0


def test_vllm_api_key_and_flat_errors(procs: Spawner) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.fake(
        "vllm",
        "serve",
        "m",
        "--host=127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        "sekrit",
        env={"FAKE_VLLM_LOAD_SECONDS": "0", "FAKE_VLLM_FLAT_ERRORS": "1"},
    )
    wait_until(lambda: status_of(f"{base}/health") == 200, 10, what="/health without a key")
    assert status_of(f"{base}/v1/models") == 401
    assert status_of(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}) == 401
    auth = {"Authorization": "Bearer sekrit"}
    assert httpx.get(f"{base}/v1/models", headers=auth).json()["data"][0]["id"] == "m"
    missing = httpx.post(
        f"{base}/v1/chat/completions",
        headers=auth,
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )
    assert missing.status_code == 404
    assert missing.json() == {
        "object": "error",
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


def test_vllm_command_line_and_load_failures(procs: Spawner) -> None:
    vllm = str(FAKES / "vllm")
    no_model = procs.run(vllm, "serve")
    assert no_model.returncode == 2 and "usage:" in no_model.stderr
    unknown = procs.run(vllm, "serve", "m", "--no-such-flag")
    assert unknown.returncode == 2 and "unrecognized arguments" in unknown.stderr
    failed = procs.run(
        vllm,
        "serve",
        "m",
        "--port",
        str(free_port()),
        env={"FAKE_VLLM_LOAD_SECONDS": "0.1", "FAKE_VLLM_FAIL": "RuntimeError: weights corrupt"},
    )
    assert failed.returncode == 1 and "RuntimeError: weights corrupt" in failed.stderr


def test_vllm_refuses_to_start_without_free_gpu_memory(procs: Spawner, gpu_dir: Path) -> None:
    hold_in_child(procs, gpu_dir, 4000)  # 12384 MiB free < 0.9 x 16384
    env = {fakegpu.ENV: str(gpu_dir), "FAKE_VLLM_LOAD_SECONDS": "0"}
    refused = procs.run(str(FAKES / "vllm"), "serve", "m", "--port", str(free_port()), env=env)
    assert refused.returncode == 1
    assert "Free memory on device" in refused.stderr
    assert "less than desired GPU memory utilization (0.9" in refused.stderr

    port = free_port()
    proc = procs.fake(
        "vllm",
        "serve",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.5",
        env=env,
    )
    wait_until(
        lambda: status_of(f"http://127.0.0.1:{port}/health") == 200, 10, what="a start that fits"
    )
    assert fakegpu.snapshot(gpu_dir).processes[proc.pid] == 0.5 * 16384


def test_vllm_sleep_aborts_streams_frees_memory_and_wakes(procs: Spawner, gpu_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = procs.fake(
        "vllm",
        "serve",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-sleep-mode",
        env={
            fakegpu.ENV: str(gpu_dir),
            "VLLM_SERVER_DEV_MODE": "1",
            "FAKE_VLLM_LOAD_SECONDS": "0",
            "FAKE_VLLM_TOKEN_DELAY": "0.05",
        },
    )
    wait_until(lambda: status_of(f"{base}/health") == 200, 10, what="/health 200")
    full = 0.9 * 16384
    assert fakegpu.snapshot(gpu_dir).processes[proc.pid] == full
    chat = {"model": "m", "messages": [{"role": "user", "content": " ".join(["word"] * 40)}]}

    with httpx.Client(base_url=base, timeout=5) as client:
        assert client.get("/is_sleeping").json() == {"is_sleeping": False}
        seen: list[str] = []
        with client.stream(
            "POST", "/v1/chat/completions", json={**chat, "stream": True}
        ) as response:
            lines = response.iter_lines()
            seen.append(
                wait_until(
                    lambda: next(x for x in lines if x.startswith("data: ")), 10, what="a chunk"
                )
            )
            with httpx.Client(base_url=base, timeout=5) as other:
                assert other.post("/sleep", params={"level": "1"}).status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                seen.extend(lines)  # the in-flight stream is cut off, never reaching [DONE]
        assert "data: [DONE]" not in seen

        assert client.get("/is_sleeping").json() == {"is_sleeping": True}
        assert fakegpu.snapshot(gpu_dir).processes[proc.pid] == 1024  # the CUDA context stays
        asleep = client.post("/v1/chat/completions", json=chat)
        assert asleep.status_code == 503 and "error" in asleep.json()

        fakegpu.hold(4000, gpu_dir)  # someone else took the memory meanwhile: waking fails
        try:
            failed = client.post("/wake_up")
            assert failed.status_code == 500 and failed.json()["error"]["code"] == 500
            assert client.get("/is_sleeping").json() == {"is_sleeping": True}
            assert fakegpu.snapshot(gpu_dir).processes[proc.pid] == 1024
        finally:
            fakegpu.hold(0, gpu_dir)
        assert client.post("/wake_up").status_code == 200
        assert client.get("/is_sleeping").json() == {"is_sleeping": False}
        assert fakegpu.snapshot(gpu_dir).processes[proc.pid] == full
        awake = client.post(
            "/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert awake.json()["choices"][0]["message"]["content"] == "vllm m says: hi"


# --- Ollama -------------------------------------------------------------------------------------


def expires_at(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["expires_at"])


@pytest.mark.parametrize("resets", [False, True], ids=["since-0.1.49", "before-0.1.49"])
def test_ollama_v1_requests_keep_or_reset_the_keep_alive(procs: Spawner, resets: bool) -> None:
    """Since v0.1.49 a /v1 request keeps the runner's keep_alive (a pin stays a pin); before,
    it reset it to the 5-minute default (the fake's FAKE_OLLAMA_V1_RESETS_KEEP_ALIVE)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.fake(
        "ollama",
        "serve",
        env={
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            "FAKE_OLLAMA_MODELS": "qwen3:8b=5200",
            "FAKE_OLLAMA_V1_RESETS_KEEP_ALIVE": "1" if resets else "",
        },
    )
    wait_until(lambda: status_of(f"{base}/api/version") == 200, 10, what="ollama to listen")
    body = {"model": "qwen3:8b", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=base, timeout=10) as client:

        def expires() -> datetime:
            stamp = client.get("/api/ps").json()["models"][0]["expires_at"]
            return datetime.fromisoformat(stamp)

        assert client.post("/v1/chat/completions", json=body).status_code == 200
        fresh = expires()  # a load by /v1: the default keep_alive, about 5 minutes
        assert timedelta(minutes=4) < fresh - datetime.now(fresh.tzinfo) <= timedelta(minutes=5)
        assert client.post("/api/generate", json={"model": "qwen3:8b", "keep_alive": -1}).json()
        assert expires().year > 2200  # pinned
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        after = expires()
    assert (after.year < 2200) is resets


def test_ollama_preload_ps_unload_and_keep_alive(procs: Spawner, gpu_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = procs.fake(
        "ollama",
        "serve",
        env={
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            fakegpu.ENV: str(gpu_dir),
            "FAKE_OLLAMA_MODELS": "qwen3:8b=5200,llama3.2:1b=1300,tiny=100",
            "FAKE_OLLAMA_LOAD_SECONDS": "0.3",
            "FAKE_OLLAMA_UNLOAD_SECONDS": "1.0",
        },
    )
    wait_until(lambda: status_of(f"{base}/api/version") == 200, 10, what="ollama to listen")
    assert f"Listening on 127.0.0.1:{port} (version 0.12.0)" in procs.log(proc)

    def ps() -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in client.get("/api/ps").json()["models"]}

    def held() -> float:
        return fakegpu.snapshot(gpu_dir).processes.get(proc.pid, 0.0)

    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/api/version").json() == {"version": "0.12.0"}
        tags = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
        assert set(tags) == {"qwen3:8b", "llama3.2:1b", "tiny:latest"}
        assert (
            tags["qwen3:8b"]["size"] == 5200 * MIB
            and tags["qwen3:8b"]["details"]["format"] == "gguf"
        )
        assert ps() == {}

        loaded = client.post("/api/generate", json={"model": "tiny"}).json()
        assert (loaded["model"], loaded["done"], loaded["done_reason"]) == (
            "tiny:latest",
            True,
            "load",
        )
        entry = ps()["tiny:latest"]
        assert set(entry) == {
            "name",
            "model",
            "size",
            "digest",
            "details",
            "expires_at",
            "size_vram",
            "context_length",
        }
        left = expires_at(entry) - datetime.now().astimezone()
        assert timedelta(minutes=4) < left <= timedelta(minutes=5), "default keep_alive is 5m"
        assert held() == 100

        # Two concurrent preloads of one model: one load, both answered once it is done.
        replies: list[dict[str, Any]] = []
        threads = [
            threading.Thread(
                target=lambda: replies.append(
                    client.post(
                        "/api/generate", json={"model": "qwen3:8b", "keep_alive": -1}
                    ).json()
                )
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert [r["done"] for r in replies] == [True, True]
        assert procs.log(proc).count("loading model qwen3:8b") == 1
        assert expires_at(ps()["qwen3:8b"]).year > 2200, "keep_alive -1 means forever"
        assert held() == 5300

        unloaded = client.post(
            "/api/generate", json={"model": "tiny:latest", "keep_alive": 0}
        ).json()
        assert (unloaded["model"], unloaded["done"], unloaded["done_reason"]) == (
            "tiny:latest",
            True,
            "unload",
        )
        assert "tiny:latest" in ps(), "the unload lands only after the reply"
        wait_until(lambda: "tiny:latest" not in ps(), 5, what="the unload")
        assert held() == 5200

        client.post(
            "/api/generate", json={"model": "llama3.2:1b", "keep_alive": "1s"}
        ).raise_for_status()
        assert "llama3.2:1b" in ps()
        wait_until(lambda: "llama3.2:1b" not in ps(), 5, what="keep_alive expiry")
        assert held() == 5200

        missing = client.post("/api/generate", json={"model": "nope"})
        assert missing.status_code == 404 and missing.json() == {"error": "model 'nope' not found"}
        malformed = client.post("/api/generate", content=b"{model")
        assert malformed.status_code == 400 and isinstance(malformed.json()["error"], str)
        bad_duration = client.post("/api/generate", json={"model": "tiny", "keep_alive": "soon"})
        assert bad_duration.status_code == 400


def test_ollama_openai_lazy_load_errors_and_stream(procs: Spawner) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = procs.fake(
        "ollama",
        "serve",
        env={
            "OLLAMA_HOST": f"http://127.0.0.1:{port}",
            "FAKE_OLLAMA_MODELS": "qwen3:8b=5200,llama3=4700",
            "FAKE_OLLAMA_LOAD_SECONDS": "0.1",
        },
    )
    wait_until(lambda: status_of(f"{base}/api/version") == 200, 10, what="ollama to listen")
    with httpx.Client(base_url=base, timeout=10) as client:
        listed = client.get("/v1/models").json()
        assert listed["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"]) for m in listed["data"]] == [
            ("qwen3:8b", "model", "library"),
            ("llama3:latest", "model", "library"),
        ]
        assert client.get("/api/ps").json() == {"models": []}, "listing models must not load any"

        chat = {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}]}
        reply = client.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(
            "application/json"
        )
        body = reply.json()
        assert (body["object"], body["model"], body["system_fingerprint"]) == (
            "chat.completion",
            "llama3:latest",
            "fp_ollama",
        )
        assert body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["message"] == {
            "role": "assistant",
            "content": "ollama llama3:latest says: hello there",
        }
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        assert [m["name"] for m in client.get("/api/ps").json()["models"]] == ["llama3:latest"]

        missing = client.post("/v1/chat/completions", json={**chat, "model": "nope"})
        assert missing.status_code == 404
        assert missing.json() == {
            "error": {
                "message": 'model "nope" not found, try pulling it first',
                "type": "api_error",
                "param": None,
                "code": None,
            }
        }
        empty = client.post("/v1/chat/completions", json={**chat, "messages": []})
        assert empty.status_code == 400
        assert empty.json() == {
            "error": {
                "message": "[] is too short - 'messages'",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }

        chunks = chat_stream(client, {**chat, "model": "qwen3:8b"})
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "qwen3:8b" for c in chunks)
    deltas = [c["choices"][0] for c in chunks[:-2]]
    assert all(d["delta"]["role"] == "assistant" and d["finish_reason"] is None for d in deltas)
    assert "".join(d["delta"]["content"] for d in deltas) == "ollama qwen3:8b says: hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(deltas)
    stop_gracefully(procs, proc, "shutting down")


def test_ollama_command_line(procs: Spawner) -> None:
    done = procs.run(str(FAKES / "ollama"), "run", "qwen3:8b")
    assert done.returncode == 2 and "ollama serve" in done.stderr
