"""The ``command`` backend through a real swapper: any server started from a command line.

The server is ``tests/fake_servers/openai_media``, a real subprocess answering OpenAI's media and
chat endpoints; it refuses requests with a 503 until it is ready, as llama-server does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from swapper_command import CommandBackend, CommandModel

from swapper.backends.registry import load_backends
from swapper.config import load_config
from swapper.errors import ConfigError
from tests.conftest import FAKES, SwapperProcess, sdk, wait_until

pytestmark = pytest.mark.integration

FAKE = str(FAKES / "openai_media")


def served(*args: str, **entry: Any) -> dict[str, Any]:
    """A ``command`` entry running the fake media server."""
    command = [sys.executable, FAKE, "--port", "${PORT}", *args]
    return {"backend": "command", "command": command, **entry}


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_port_and_model_id_are_substituted_and_ready_is_the_entry_path(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    # The fake refuses requests for 1 s and answers 200 only on /warm: a swapper that polled
    # /health, or did not wait, would fail the chat.
    models = {
        "whisper": served(
            "--model", "${MODEL_ID}", "--ready-path", "/warm", "--ready-after", "1", ready="/warm"
        )
    }
    swapper = swapper_factory(models=models)
    answer = sdk(swapper).chat.completions.create(
        model="whisper", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "model=whisper"  # the fake's --model
    model = swapper.wait_status("whisper", "LOADED")
    argv = cmdline(model["pid"])
    assert argv[argv.index("--port") + 1] == str(model["port"])
    assert argv[argv.index("--model") + 1] == "whisper"


def test_the_servers_name_is_used_upstream_and_swappers_id_comes_back(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    models = {"chat": served("--model", "tiny.gguf", upstream_model="tiny.gguf")}
    client = sdk(swapper_factory(models=models))
    messages: Any = [{"role": "user", "content": "hi"}]
    answer = client.chat.completions.create(model="chat", messages=messages)
    assert (answer.model, answer.choices[0].message.content) == ("chat", "model=tiny.gguf")
    chunks = list(client.chat.completions.create(model="chat", messages=messages, stream=True))
    assert {chunk.model for chunk in chunks} == {"chat"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "model=tiny.gguf"


def test_a_missing_program_is_refused_before_anything_starts(
    swapper_factory: Callable[..., SwapperProcess], tmp_path: Path
) -> None:
    missing = str(tmp_path / "whisper-server")
    swapper = swapper_factory(models={"w": {"backend": "command", "command": [missing, "${PORT}"]}})
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(swapper).chat.completions.create(model="w", messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 503
    assert f"command {missing!r} does not exist" in raised.value.message


def test_a_crash_is_noticed_with_the_exit_status(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    swapper = swapper_factory(models={"whisper": served()})
    swapper.http.post("/models/whisper/load").raise_for_status()
    port = swapper.wait_status("whisper", "LOADED")["port"]
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://127.0.0.1:{port}/fake/exit", timeout=10)
    failed = swapper.wait_status("whisper", "FAILED")
    assert "exited with status 3" in failed["last_error"]


def test_stop_command_stops_the_server_with_substitutions(
    swapper_factory: Callable[..., SwapperProcess], tmp_path: Path
) -> None:
    marker = tmp_path / "signals"
    stop = [
        sys.executable,
        "-c",
        "import sys, urllib.request; urllib.request.urlopen("
        "f'http://127.0.0.1:{sys.argv[1]}/fake/shutdown', data=sys.argv[2].encode())",
        "${PORT}",
        "${MODEL_ID}",
    ]
    models = {"whisper": served("--signal-file", str(marker), stop_command=stop)}
    swapper = swapper_factory(models=models)
    swapper.http.post("/models/whisper/load").raise_for_status()
    pid = swapper.wait_status("whisper", "LOADED")["pid"]
    swapper.http.post("/models/whisper/unload").raise_for_status()
    swapper.wait_status("whisper", "UNLOADED")
    # The stop command reached the server (not SIGTERM, which the fake would have noted).
    assert marker.read_text() == "shutdown whisper\n"
    assert not Path(f"/proc/{pid}").exists()


def test_a_stop_command_that_does_nothing_falls_back_to_sigkill(
    swapper_factory: Callable[..., SwapperProcess], tmp_path: Path
) -> None:
    marker = tmp_path / "signals"
    models = {"whisper": served("--signal-file", str(marker), stop_command=["true"])}
    swapper = swapper_factory(swapper={"stop_timeout": 1}, models=models)
    swapper.http.post("/models/whisper/load").raise_for_status()
    pid = swapper.wait_status("whisper", "LOADED")["pid"]
    swapper.http.post("/models/whisper/unload").raise_for_status()
    swapper.wait_status("whisper", "UNLOADED")
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the server to be reaped")
    assert not marker.exists()  # neither the stop command nor SIGTERM reached it: SIGKILL did


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"command": []}, "models.w.command: must be a non-empty list"),
        ({"command": ["srv", "--port", "8080"]}, "models.w.command: must contain ${PORT}"),
        ({"command": ["srv", "${PORT}"], "ready": "health"}, "models.w.ready: must be a path"),
        ({"command": ["srv", "${PORT}"], "endpoints": ["v1/x"]}, "models.w.endpoints: 'v1/x'"),
        ({"command": ["srv", "${PORT}"], "stop_command": []}, "models.w.stop_command: must be"),
        ({"command": ["srv", "${PORT}"], "upstream_model": " "}, "models.w.upstream_model: must"),
        ({"command": ["srv", "${PORT}"], "colour": "red"}, "colour"),
    ],
)
def test_bad_entries_name_the_key(tmp_path: Path, entry: dict[str, Any], error: str) -> None:
    path = tmp_path / "swapper.yaml"
    path.write_text(
        "models:\n  w:\n"
        + "".join(
            f"    {key}: {value!r}\n" for key, value in {"backend": "command", **entry}.items()
        )
    )
    with pytest.raises(ConfigError) as raised:
        load_config(str(path), load_backends().schemas())
    assert error in str(raised.value)


def test_endpoints_default_to_chat_completions_embeddings() -> None:
    plain = CommandModel(backend="command", command=["s", "${PORT}"])
    assert CommandBackend.serves(plain) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
    audio = CommandModel(
        backend="command", command=["s", "${PORT}"], endpoints=["/v1/audio/transcriptions"]
    )
    assert CommandBackend.serves(audio) == {"/v1/audio/transcriptions"}
