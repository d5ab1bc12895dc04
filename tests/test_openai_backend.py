"""The ``openai`` backend: an already-running OpenAI-compatible server, no process of swapper's.

The "remote" server is ``tests/fake_servers/openai_media`` run by the test as a real subprocess,
checking ``Authorization: Bearer <key>`` as OpenAI-compatible servers started with a key do.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from swapper.backends.registry import load_backends
from swapper.config import load_config
from swapper.errors import ConfigError
from tests.conftest import FAKES, SwapperProcess, free_port, sdk, wait_until

pytestmark = pytest.mark.integration

KEY = "sk-remote-7f3a9c"
UPSTREAM = "Qwen/Qwen3-32B"


class Remote:
    """The fake server as a subprocess on a loopback port."""

    def __init__(self, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        argv = [sys.executable, str(FAKES / "openai_media"), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._up, 30, "the fake remote server to answer")

    def _up(self) -> bool:
        assert self.proc.poll() is None, "the fake remote server exited"
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    server = Remote(tmp_path / "remote.log", "--api-key", KEY, "--model", UPSTREAM)
    yield server
    server.stop()


def entry(remote: Remote, **extra: Any) -> dict[str, Any]:
    return {"backend": "openai", "url": remote.url, "upstream_model": UPSTREAM, **extra}


def test_chat_and_stream_carry_the_key_and_swappers_id(
    swapper_factory: Callable[..., SwapperProcess], remote: Remote
) -> None:
    models = {"big-remote": entry(remote, api_key="${env:REMOTE_KEY}", aliases=["big"])}
    swapper = swapper_factory(models=models, env={"REMOTE_KEY": KEY})
    client = sdk(swapper)
    answer = client.chat.completions.create(
        model="big", messages=[{"role": "user", "content": "hi"}]
    )
    # The server saw its own name; the client sees swapper's id, never the server's name.
    assert answer.choices[0].message.content == f"model={UPSTREAM}"
    assert answer.model == "big-remote"
    chunks = list(
        client.chat.completions.create(
            model="big-remote", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert len(chunks) == 3
    assert {chunk.model for chunk in chunks} == {"big-remote"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"model={UPSTREAM}"
    model = swapper.model("big-remote")
    assert model["status"] == "LOADED"
    assert model["pid"] is None  # no process of swapper's
    # The key never shows: not in /status, not in swapper's output.
    assert KEY not in swapper.http.get("/status").text
    assert KEY not in swapper.output()


def test_a_refused_key_is_a_clear_error_that_does_not_show_it(
    swapper_factory: Callable[..., SwapperProcess], remote: Remote
) -> None:
    wrong = "sk-wrong-51b2"
    swapper = swapper_factory(models={"big-remote": entry(remote, api_key=wrong)})
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(swapper).chat.completions.create(
            model="big-remote", messages=[{"role": "user", "content": "hi"}]
        )
    error = raised.value
    assert error.status_code == 503
    assert f"the server at {remote.url} refused the api_key (HTTP 401)" in error.message
    failed = swapper.wait_status("big-remote", "FAILED")
    for where in (
        error.message,
        str(error.body),
        swapper.http.get("/status").text,
        swapper.output(),
    ):
        assert wrong not in where
    assert "refused the api_key" in failed["last_error"]


def test_no_key_for_a_server_that_needs_one(
    swapper_factory: Callable[..., SwapperProcess], remote: Remote
) -> None:
    swapper = swapper_factory(models={"big-remote": entry(remote)})
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(swapper).chat.completions.create(
            model="big-remote", messages=[{"role": "user", "content": "hi"}]
        )
    assert "needs an api_key (HTTP 401)" in raised.value.message


def test_remote_models_take_slots_like_any_model(
    swapper_factory: Callable[..., SwapperProcess], remote: Remote
) -> None:
    # Two models on one remote server, one slot: using the second unloads the first.
    models = {
        "first": entry(remote, api_key=KEY),
        "second": entry(remote, api_key=KEY),
    }
    swapper = swapper_factory(models=models)
    client = sdk(swapper)
    messages: Any = [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model="first", messages=messages).model == "first"
    assert swapper.model("first")["status"] == "LOADED"
    assert client.chat.completions.create(model="second", messages=messages).model == "second"
    status = swapper.status()["models"]
    assert (status["first"]["status"], status["second"]["status"]) == ("UNLOADED", "LOADED")


def test_a_server_that_goes_away_is_noticed(
    swapper_factory: Callable[..., SwapperProcess], remote: Remote
) -> None:
    swapper = swapper_factory(models={"big-remote": entry(remote, api_key=KEY)})
    swapper.http.post("/models/big-remote/load").raise_for_status()
    swapper.wait_status("big-remote", "LOADED")
    remote.stop()
    failed = swapper.wait_status("big-remote", "FAILED", timeout=60)
    assert f"the server at {remote.url} stopped answering" in failed["last_error"]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"url": "127.0.0.1:8000"}, "models.r.url: must start with http://"),
        ({"url": "http://h:8000/v1"}, "models.r.url: give the server's root, without /v1"),
        ({"url": "http://h", "api_key": " "}, "models.r.api_key: must not be empty"),
        ({"url": "http://h", "upstream_model": ""}, "models.r.upstream_model: must not be empty"),
    ],
)
def test_bad_entries_name_the_key(tmp_path: Path, extra: dict[str, Any], error: str) -> None:
    path = tmp_path / "swapper.yaml"
    body = "".join(f"    {k}: {v!r}\n" for k, v in {"backend": "openai", **extra}.items())
    path.write_text("models:\n  r:\n" + body)
    with pytest.raises(ConfigError) as raised:
        load_config(str(path), load_backends().schemas())
    assert error in str(raised.value)


def test_uploads_and_audio_carry_the_key_and_the_servers_name(
    swapper_factory: Callable[..., SwapperProcess], remote: Remote
) -> None:
    swapper = swapper_factory(models={"big-remote": entry(remote, api_key=KEY)})
    client = sdk(swapper)
    audio = b"\x01\x02" * 50_000
    text = client.audio.transcriptions.create(model="big-remote", file=("a.wav", audio)).text
    assert text == f"model={UPSTREAM} bytes={len(audio)} sha256={hashlib.sha256(audio).hexdigest()}"
    speech = client.audio.speech.create(model="big-remote", voice="alloy", input="hi").read()
    assert speech[:32] == hashlib.sha256(f"{UPSTREAM}|hi".encode()).digest()


def test_the_fake_speaks_what_the_openai_sdk_expects(remote: Remote) -> None:
    # The fake itself, with no swapper in between: the SDK parses each of its answers.
    client = openai.OpenAI(base_url=f"{remote.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [UPSTREAM]
    text = client.audio.transcriptions.create(model=UPSTREAM, file=("a.wav", b"abc")).text
    assert text == f"model={UPSTREAM} bytes=3 sha256={hashlib.sha256(b'abc').hexdigest()}"
    image = client.images.generate(model=UPSTREAM, prompt="p").data
    assert image is not None and image[0].b64_json
    answer = client.chat.completions.create(
        model=UPSTREAM, messages=[{"role": "user", "content": "x"}]
    )
    assert answer.choices[0].message.content == f"model={UPSTREAM}"
    wrong = openai.OpenAI(base_url=f"{remote.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="other", prompt="p")
