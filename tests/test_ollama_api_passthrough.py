"""Models of the ``ollama`` backend behind swapper's ``/api/*``: passed through, untranslated,
to the faithful fake ``ollama serve`` (tests/fake_servers/ollama)."""

from __future__ import annotations

import time
from typing import Any

import ollama
import pytest

from tests.conftest import FAKES, SwapperProcess

pytestmark = pytest.mark.integration

OLLAMA = str(FAKES / "ollama")


@pytest.fixture
def swapper(swapper_factory: Any) -> SwapperProcess:
    models = {
        "qwen": {"backend": "ollama", "model": "qwen3:8b", "serve": True, "binary": OLLAMA},
        "tiny-a": {
            "backend": "llamacpp",
            "model_path": str(swapper_factory.workdir / "tiny-a.gguf"),
            "ctx_size": 512,
        },
    }
    process: SwapperProcess = swapper_factory(
        models=models, env={"FAKE_OLLAMA_MODELS": "qwen3:8b=5200"}
    )
    return process


def test_generate_goes_to_ollamas_own_endpoint(swapper: SwapperProcess) -> None:
    c = ollama.Client(host=swapper.url, timeout=60)
    whole = c.generate(model="qwen", prompt="hi there", stream=False)
    assert whole.response == "ollama qwen3:8b says: hi there"
    # Ollama's own final object, as the fake writes it: counts but no durations. A translated
    # answer would carry swapper's total_duration.
    assert whole.done_reason == "stop" and whole.prompt_eval_count == 2
    assert whole.total_duration is None
    assert whole.model == "qwen"  # the name the client used, not Ollama's tag
    parts = list(c.generate(model="qwen:latest", prompt="stream please", stream=True))
    assert "".join(p.response for p in parts) == "ollama qwen3:8b says: stream please"
    assert parts[-1].done is True
    assert {p.model for p in parts} == {"qwen:latest"}
    assert swapper.model("qwen")["status"] == "LOADED"


def test_keep_alive_zero_is_swappers_to_apply(swapper: SwapperProcess) -> None:
    c = ollama.Client(host=swapper.url, timeout=60)
    c.generate(model="qwen", prompt="hi", stream=False, keep_alive=0)
    # swapper unloads it (stopping the ollama serve it owns), not Ollama behind its back.
    swapper.wait_status("qwen", "UNLOADED")
    # Ollama's preload and unload requests are swapper's loads and unloads too.
    assert c.generate(model="qwen").done_reason == "load"
    assert swapper.model("qwen")["status"] == "LOADED"
    assert c.generate(model="qwen", keep_alive=0).done_reason == "unload"
    swapper.wait_status("qwen", "UNLOADED")


def test_tags_lists_both_backends(swapper: SwapperProcess) -> None:
    listed = {m.model: m for m in ollama.Client(host=swapper.url).list().models}
    assert set(listed) == {"qwen:latest", "tiny-a:latest"}
    qwen = listed["qwen:latest"].details
    assert qwen is not None and qwen.format == ""  # no local GGUF file: details unknown
    tiny = listed["tiny-a:latest"].details
    assert tiny is not None and tiny.format == "gguf"


def test_a_native_stream_is_relayed_line_by_line_as_it_arrives(swapper_factory: Any) -> None:
    delay = 0.2  # the fake waits this long before each word
    models = {"qwen": {"backend": "ollama", "model": "qwen3:8b", "serve": True, "binary": OLLAMA}}
    swapper = swapper_factory(
        models=models,
        env={"FAKE_OLLAMA_MODELS": "qwen3:8b=5200", "FAKE_OLLAMA_TOKEN_DELAY": str(delay)},
    )
    c = ollama.Client(host=swapper.url, timeout=60)
    c.generate(model="qwen")  # loaded first: only the generation is timed below
    arrivals = []
    for part in c.generate(model="qwen", prompt="one two three", stream=True):
        arrivals.append(time.monotonic())
        assert part.model == "qwen"
    # Seven words, each after a pause: held back until the end, they would arrive together.
    assert len(arrivals) >= 5
    assert arrivals[-2] - arrivals[0] >= 3 * delay
