"""The Ollama backend through a real swapper, in front of the faithful fake ``ollama serve``.

Ollama cannot run here (no weights are downloaded); ``tests/fake_servers/ollama`` is a real
subprocess speaking Ollama's API as docs/backends.md describes it: preload and unload through
``/api/generate`` keep_alive, ``/api/ps``, and the OpenAI-compatible ``/v1`` endpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FAKES, SwapperProcess, free_port, process_state, wait_until

pytestmark = pytest.mark.integration

OLLAMA = str(FAKES / "ollama")
PULLED = "qwen3:8b=5200,llama3.2=1300"


def ps(base_url: str) -> dict[str, dict[str, Any]]:
    """What Ollama says is loaded, by name."""
    models = httpx.get(f"{base_url}/api/ps", timeout=5).json()["models"]
    return {m["name"]: m for m in models}


def on(base_url: str, tag: str) -> dict[str, Any]:
    """A model entry for ``tag`` on an Ollama swapper does not own."""
    return {"backend": "ollama", "model": tag, "base_url": base_url}


def settled(swapper: SwapperProcess, model_id: str) -> dict[str, Any]:
    """The model's status once swapper noticed it is no longer loaded (and is done unloading)."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (m := swapper.model(model_id))["status"] not in ("LOADED", "UNLOADING") and m,
        15,
        f"swapper to notice {model_id} is gone",
    )


def client(swapper: SwapperProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{swapper.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def external_ollama(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """An Ollama that swapper does not own (as on most hosts): its base URL. Parametrized
    indirectly, the parameter is extra environment for the fake."""
    port = free_port()
    env = {
        **os.environ,
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "FAKE_OLLAMA_MODELS": PULLED,
        **getattr(request, "param", {}),
    }
    log = (tmp_path / "ollama.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, OLLAMA, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/version", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, 10, "the fake Ollama to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_a_chat_through_an_ollama_swapper_runs_itself(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    models = {
        "qwen": {
            "backend": "ollama",
            "model": "qwen3:8b",
            "serve": True,
            "binary": OLLAMA,
            "vram_mb": 1000,
            # Reaches ollama serve, except the address: swapper picks the port.
            "env": {"OLLAMA_DEBUG": "1", "OLLAMA_HOST": "0.0.0.0:11434"},
        }
    }  # an estimate, to be replaced
    swapper = swapper_factory(models=models, env={"FAKE_OLLAMA_MODELS": PULLED})
    assert swapper.model("qwen")["predicted_vram_mb"] == 1000
    sdk = client(swapper)
    answer = sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}])
    # The tag was sent to Ollama; the client sees swapper's id.
    assert answer.choices[0].message.content == "ollama qwen3:8b says: hi"
    assert answer.model == "qwen"
    status = swapper.model("qwen")
    assert status["status"] == "LOADED" and status["backend"] == "ollama"
    ollama_url = f"http://127.0.0.1:{status['port']}"
    child_env = Path(f"/proc/{status['pid']}/environ").read_bytes().split(b"\0")
    assert b"OLLAMA_DEBUG=1" in child_env
    assert f"OLLAMA_HOST=127.0.0.1:{status['port']}".encode() in child_env
    assert b"OLLAMA_KEEP_ALIVE=-1" in child_env
    loaded = ps(ollama_url)
    assert list(loaded) == ["qwen3:8b"]
    # Measured through Ollama's own size_vram, and kept for the next start.
    assert wait_until(lambda: swapper.model("qwen")["vram_mb"], 10, "a VRAM figure") == 5200
    state = json.loads((swapper.workdir / "state/swapper/state.json").read_text())
    assert state["models"]["qwen"]["vram_mb"] == 5200

    chunks = list(
        sdk.chat.completions.create(
            model="qwen",
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {chunk.model for chunk in chunks} == {"qwen"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "ollama qwen3:8b says: stream please"
    assert chunks[-1].usage is not None and chunks[-1].choices == []

    # swapper owns that ollama serve: unloading the model stops it, and nothing is left.
    pid = status["pid"]
    assert pid and process_state(pid) is not None
    assert swapper.http.post("/models/qwen/unload").status_code == 200
    assert swapper.model("qwen")["status"] == "UNLOADED"
    wait_until(lambda: process_state(pid) is None, 10, "ollama serve to exit")

    # The measured size survives a restart: a new swapper plans with it before any load.
    swapper.stop()
    again = swapper_factory(models=models, env={"FAKE_OLLAMA_MODELS": PULLED})
    assert again.model("qwen")["status"] == "UNLOADED"
    assert again.model("qwen")["predicted_vram_mb"] == 5200


def test_a_swap_unloads_from_ollama_before_the_next_model_loads(
    swapper_factory: Callable[..., SwapperProcess],
    external_ollama: str,
    tmp_path: Path,
) -> None:
    swapper = swapper_factory(
        models={
            "qwen": on(external_ollama, "qwen3:8b"),
            "llama": on(external_ollama, "llama3.2"),
        }
    )
    sdk = client(swapper)
    sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "a"}])
    assert list(ps(external_ollama)) == ["qwen3:8b"]
    answer = sdk.chat.completions.create(model="llama", messages=[{"role": "user", "content": "b"}])
    # "llama3.2" is "llama3.2:latest" to Ollama; the client still sees swapper's id.
    assert answer.model == "llama"
    assert answer.choices[0].message.content == "ollama llama3.2:latest says: b"
    # An Ollama swapper does not run (serve: false) is no process of swapper's: no pid, no port.
    loaded = swapper.model("llama")
    assert loaded["status"] == "LOADED" and loaded["pid"] is None and loaded["port"] is None
    # Single-active: qwen was unloaded (and gone from /api/ps) before llama loaded.
    assert list(ps(external_ollama)) == ["llama3.2:latest"]
    assert swapper.model("qwen")["status"] == "UNLOADED"
    # The order, from Ollama's own log: qwen was gone before llama started loading.
    log = (tmp_path / "ollama.log").read_text()
    assert log.index("unloaded model qwen3:8b") < log.index("loading model llama3.2:latest")
    assert swapper.http.post("/models/llama/unload").status_code == 200
    assert ps(external_ollama) == {}


def test_ollama_errors_come_back_as_openai_errors(
    swapper_factory: Callable[..., SwapperProcess],
    external_ollama: str,
) -> None:
    swapper = swapper_factory(
        models={
            "qwen": on(external_ollama, "qwen3:8b"),
            "ghost": on(external_ollama, "ghost:7b"),
        }
    )
    sdk = client(swapper)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="qwen", messages=[])
    error = bad.value.body
    assert isinstance(error, dict) and "too short" in error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    # A tag Ollama has not pulled: the load fails with Ollama's own reason.
    with pytest.raises(openai.InternalServerError) as failed:
        sdk.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 503
    assert isinstance(failed.value.body, dict)
    assert set(failed.value.body) >= {"message", "type", "param", "code"}
    assert "model 'ghost:7b' not found" in failed.value.body["message"]
    assert swapper.model("ghost")["status"] == "FAILED"


def test_a_pinned_model_stays_pinned_through_v1_requests(
    swapper_factory: Callable[..., SwapperProcess],
    external_ollama: str,
) -> None:
    """Ollama since v0.1.49: a /v1 request keeps the runner's keep_alive (swapper's pin)."""
    swapper = swapper_factory(models={"qwen": on(external_ollama, "qwen3:8b")})
    client(swapper).chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hi"}]
    )
    assert ps(external_ollama)["qwen3:8b"]["expires_at"] > "2200"


@pytest.mark.parametrize(
    "external_ollama", [{"FAKE_OLLAMA_V1_RESETS_KEEP_ALIVE": "1"}], indirect=True
)
def test_a_model_stays_pinned_although_each_request_resets_ollamas_keep_alive(
    swapper_factory: Callable[..., SwapperProcess],
    external_ollama: str,
) -> None:
    """Ollama before v0.1.49: every /v1 request reset keep_alive to the 5-minute default."""
    swapper = swapper_factory(models={"qwen": on(external_ollama, "qwen3:8b")})
    client(swapper).chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hi"}]
    )
    # That Ollama's /v1 endpoints set keep_alive back to its 5-minute default...
    assert ps(external_ollama)["qwen3:8b"]["expires_at"] < "2100"
    # ...and swapper's watcher pins the model again, so Ollama never unloads it on its own.
    wait_until(
        lambda: ps(external_ollama)["qwen3:8b"]["expires_at"] > "2200",
        10,
        "the model to be pinned again",
    )


def test_a_model_ollama_dropped_on_its_own_is_reported_unloaded_and_reloaded(
    swapper_factory: Callable[..., SwapperProcess],
    external_ollama: str,
) -> None:
    swapper = swapper_factory(models={"qwen": on(external_ollama, "qwen3:8b")})
    sdk = client(swapper)
    sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}])
    # Someone else unloads it straight from Ollama.
    httpx.post(f"{external_ollama}/api/generate", json={"model": "qwen3:8b", "keep_alive": 0})
    gone = settled(swapper, "qwen")
    assert gone["status"] == "UNLOADED", gone
    assert "unloaded the model itself" in gone["last_error"]
    sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "again"}])
    assert swapper.model("qwen")["status"] == "LOADED"
    assert "qwen3:8b" in ps(external_ollama)


def test_a_tag_in_any_spelling_matches_the_normalised_name_ollama_lists(
    swapper_factory: Callable[..., SwapperProcess],
    external_ollama: str,
) -> None:
    """Ollama lists ``ParseName(tag).DisplayShortest()``, and compares names case-insensitively."""
    swapper = swapper_factory(
        swapper={"model_swap_timeout": 10},
        models={
            "qwen": on(external_ollama, "registry.ollama.ai/library/QWEN3:8b"),
            "llama": on(external_ollama, "Llama3.2"),
        },
    )
    sdk = client(swapper)
    answer = sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "a"}])
    assert answer.choices[0].message.content == "ollama qwen3:8b says: a"
    # Loaded (ready once /api/ps lists it, under its short name) and measured from its entry.
    assert list(ps(external_ollama)) == ["qwen3:8b"]
    assert wait_until(lambda: swapper.model("qwen")["vram_mb"], 10, "a VRAM figure") == 5200
    sdk.chat.completions.create(model="llama", messages=[{"role": "user", "content": "b"}])
    # The swap waited for the unload to show in /api/ps under that other spelling.
    assert list(ps(external_ollama)) == ["llama3.2:latest"]
    assert swapper.model("qwen")["status"] == "UNLOADED"
    assert swapper.model("llama")["status"] == "LOADED"


@pytest.mark.parametrize("external_ollama", [{"OLLAMA_MAX_LOADED_MODELS": "1"}], indirect=True)
def test_a_model_ollamas_scheduler_evicts_is_reported_unloaded_by_ollama(
    swapper_factory: Callable[..., SwapperProcess],
    external_ollama: str,
    tmp_path: Path,
) -> None:
    """Ollama unloads an idle runner, pinned or not, to fit another model: not a crash."""
    swapper = swapper_factory(
        swapper={"mode": "multi-active", "max_concurrent_models": 2},
        models={"qwen": on(external_ollama, "qwen3:8b"), "llama": on(external_ollama, "llama3.2")},
    )
    sdk = client(swapper)
    sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "a"}])
    sdk.chat.completions.create(model="llama", messages=[{"role": "user", "content": "b"}])
    # swapper kept both (multi-active); Ollama, allowed one, evicted the idle qwen for llama.
    assert list(ps(external_ollama)) == ["llama3.2:latest"]
    assert "evicting model qwen3:8b" in (tmp_path / "ollama.log").read_text()
    gone = settled(swapper, "qwen")
    assert gone["status"] == "UNLOADED", gone
    assert "it unloaded the model itself" in gone["last_error"]
    assert "OLLAMA_MAX_LOADED_MODELS" in gone["last_error"]
    assert swapper.model("llama")["status"] == "LOADED"
    # Nothing crashed: the next request simply loads it again.
    answer = sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "c"}])
    assert answer.choices[0].message.content == "ollama qwen3:8b says: c"


def test_an_ollama_that_does_not_answer_fails_the_load_at_once(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    swapper = swapper_factory(models={"qwen": on(closed, "qwen3:8b")})
    response = swapper.http.post(
        "/v1/chat/completions",
        json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 503
    assert f"Ollama at {closed} does not answer" in response.json()["error"]["message"]
