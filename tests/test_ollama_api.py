"""Ollama's own API (``/api/*``) through a real swapper on real llama-servers, driven by the
official ``ollama`` Python client."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.conftest import FAKES, SwapperProcess, wait_until
from tests.fake_servers import fakegpu

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]


def client(swapper: SwapperProcess) -> ollama.Client:
    return ollama.Client(host=swapper.url, timeout=60)


@pytest.fixture
def swapper(swapper_factory: Any) -> SwapperProcess:
    process: SwapperProcess = swapper_factory()
    return process


def test_list_shows_every_model_with_its_gguf_details_and_loads_none(
    swapper: SwapperProcess, tiny_models: dict[str, Any]
) -> None:
    listed = client(swapper).list().models
    assert [m.model for m in listed] == ["tiny-a:latest", "tiny-b:latest", "tiny-c:latest"]
    first = listed[0]
    assert first.size == tiny_models["a"].stat().st_size
    assert first.modified_at is not None
    assert first.details is not None
    assert first.details.format == "gguf"
    assert first.details.family == "llama"
    assert first.details.quantization_level == "F32"
    assert first.details.parameter_size == "127.8K"  # 127,808 elements in the tiny model
    assert all(m["status"] == "UNLOADED" for m in swapper.status()["models"].values())


def test_show_reports_gguf_metadata_and_the_chat_template(swapper: SwapperProcess) -> None:
    shown = client(swapper).show("a:latest")  # an alias, with Ollama's tag
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 32768
    assert shown.modelinfo["llama.embedding_length"] == 64
    assert shown.modelinfo["general.parameter_count"] == 127808
    assert shown.template is not None and "<|im_start|>" in shown.template
    assert shown.details is not None and shown.details.family == "llama"
    assert swapper.model("tiny-a")["status"] == "UNLOADED"  # show loads nothing


def test_chat_not_streamed_then_ps_lists_the_loaded_model(swapper: SwapperProcess) -> None:
    c = client(swapper)
    assert c.ps().models == []
    reply = c.chat(model="tiny-a", messages=MESSAGES, stream=False, options={"num_predict": 4})
    assert reply.done is True
    assert reply.done_reason == "length"  # the tiny model never stops on its own
    assert reply.message.role == "assistant"
    assert isinstance(reply.message.content, str) and reply.message.content
    assert reply.eval_count == 4
    assert reply.prompt_eval_count and reply.prompt_eval_count > 0
    assert reply.load_duration and reply.total_duration
    assert 0 < reply.load_duration < reply.total_duration
    assert reply.eval_duration and reply.eval_duration > 0  # llama-server's timings
    running = c.ps().models
    assert [m.model for m in running] == ["tiny-a:latest"]
    assert running[0].context_length == 512  # the entry's ctx_size
    assert running[0].expires_at is not None
    assert running[0].details is not None and running[0].details.family == "llama"


def test_chat_streamed_as_ndjson(swapper: SwapperProcess) -> None:
    parts = list(
        client(swapper).chat(
            model="tiny-a", messages=MESSAGES, stream=True, options={"num_predict": 5}
        )
    )
    assert len(parts) >= 2
    assert all(p.done is False for p in parts[:-1])
    last = parts[-1]
    assert last.done is True and last.done_reason == "length"
    assert last.eval_count == 5
    assert "".join(p.message.content or "" for p in parts[:-1])
    # Raw: newline-delimited JSON under Ollama's media type, streaming by default.
    with swapper.http.stream(
        "POST",
        "/api/chat",
        json={"model": "a", "messages": MESSAGES, "options": {"num_predict": 2}},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in response.iter_lines() if line]
    assert '"done":true' in lines[-1]


def test_generate_streamed_and_not(swapper: SwapperProcess) -> None:
    c = client(swapper)
    whole = c.generate(model="tiny-b", prompt="hello", options={"num_predict": 3})
    assert whole.done is True and whole.response and whole.eval_count == 3
    parts = list(c.generate(model="tiny-b", prompt="hello", stream=True, options={"seed": 1}))
    assert parts[-1].done is True and parts[-1].eval_count and parts[-1].eval_count > 0
    raw = c.generate(model="tiny-b", prompt="abc", raw=True, options={"num_predict": 2})
    assert raw.done is True and raw.eval_count == 2


def test_embed_and_the_older_embeddings(swapper_factory: Any) -> None:
    workdir = swapper_factory.workdir
    models = {
        "emb": {
            "backend": "llamacpp",
            "model_path": str(workdir / "tiny-a.gguf"),
            "ctx_size": 512,
            "args": ["--embeddings", "--pooling", "mean"],
        }
    }
    c = client(swapper_factory(models=models))
    embedded = c.embed(model="emb", input=["one", "two"])
    assert len(embedded.embeddings) == 2
    assert all(len(vector) == 64 for vector in embedded.embeddings)  # n_embd of the tiny model
    assert embedded.prompt_eval_count and embedded.prompt_eval_count > 0
    older = c.embeddings(model="emb", prompt="one")
    assert len(older.embedding) == 64
    assert "embedding" in (c.show("emb").capabilities or [])


def test_keep_alive_zero_unloads_the_model_when_the_request_ends(swapper: SwapperProcess) -> None:
    c = client(swapper)
    c.chat(model="tiny-a", messages=MESSAGES, stream=False, options={"num_predict": 1})
    assert swapper.model("tiny-a")["status"] == "LOADED"
    c.chat(
        model="tiny-a",
        messages=MESSAGES,
        stream=False,
        options={"num_predict": 1},
        keep_alive=0,
    )
    swapper.wait_status("tiny-a", "UNLOADED")


def test_generate_without_a_prompt_loads_and_keep_alive_zero_unloads(
    swapper: SwapperProcess,
) -> None:
    c = client(swapper)
    loaded = c.generate(model="tiny-c", keep_alive="10m")
    assert loaded.done is True and loaded.done_reason == "load"
    assert swapper.model("tiny-c")["status"] == "LOADED"
    unloaded = c.generate(model="tiny-c", keep_alive=0)
    assert unloaded.done_reason == "unload"
    swapper.wait_status("tiny-c", "UNLOADED")


def test_a_swap_driven_only_through_api_chat(swapper: SwapperProcess) -> None:
    c = client(swapper)
    c.chat(model="tiny-a", messages=MESSAGES, stream=False, options={"num_predict": 1})
    first = swapper.backends()
    assert len(first) == 1
    reply = c.chat(model="tiny-b", messages=MESSAGES, stream=False, options={"num_predict": 1})
    assert reply.model == "tiny-b" and reply.done is True
    status = swapper.status()["models"]
    assert status["tiny-a"]["status"] == "UNLOADED"
    assert status["tiny-b"]["status"] == "LOADED"
    wait_until(lambda: first[0] not in swapper.backends(), 10, "tiny-a's llama-server to exit")
    assert [m.model for m in c.ps().models] == ["tiny-b:latest"]


def test_errors_are_ollamas_shape_and_raise_response_error(swapper: SwapperProcess) -> None:
    c = client(swapper)
    with pytest.raises(ollama.ResponseError) as unknown:
        c.chat(model="nope", messages=MESSAGES, stream=False)
    assert unknown.value.status_code == 404
    assert unknown.value.error == 'model "nope" not found'
    with pytest.raises(ollama.ResponseError) as streamed:
        list(c.chat(model="nope", messages=MESSAGES, stream=True))
    assert streamed.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as too_long:
        c.chat(model="tiny-a", messages=MESSAGES, stream=False, options={"num_ctx": 4096})
    assert too_long.value.status_code == 400
    assert "ctx_size" in too_long.value.error and "512" in too_long.value.error
    assert swapper.model("tiny-a")["status"] == "UNLOADED"  # refused before any load
    for call in (lambda: c.pull("tiny-a"), lambda: c.delete("tiny-a")):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 501
        assert "does not manage model files" in refused.value.error
    bad = swapper.http.post("/api/chat", content=b"{not json")
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    elsewhere = swapper.http.get("/api/nothing-here")
    assert elsewhere.status_code == 404 and set(elsewhere.json()) == {"error"}


def test_version(swapper: SwapperProcess) -> None:
    response = httpx.get(f"{swapper.url}/api/version")
    assert response.status_code == 200
    assert response.json()["version"].count(".") == 2


def test_format_reaches_the_backend_and_its_refusal_comes_back_in_ollamas_shape(
    swapper: SwapperProcess,
) -> None:
    # format becomes response_format, for which llama-server builds a JSON grammar; the tiny
    # model's made-up vocabulary cannot take one, and llama-server refuses with a 400. Without
    # the translation it would answer 200: so this shows both the mapping and the error path.
    c = client(swapper)
    for form in ("json", {"type": "object", "properties": {"a": {"type": "string"}}}):
        with pytest.raises(ollama.ResponseError) as refused:
            c.chat(model="tiny-a", messages=MESSAGES, stream=False, format=form)
        assert refused.value.status_code == 400
        assert "sampler" in refused.value.error
    assert c.chat(model="tiny-a", messages=MESSAGES, stream=False, options={"num_predict": 1}).done


def test_tools_from_the_client_reach_the_backend(swapper: SwapperProcess) -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
          a: the first
          b: the second

        Returns:
          int: the sum
        """
        return a + b

    reply = client(swapper).chat(
        model="tiny-a", messages=MESSAGES, tools=[add], stream=False, options={"num_predict": 2}
    )
    # Random weights call no tool, but the backend took the tools and answered.
    assert reply.done is True and reply.eval_count == 2
    # A conversation carrying a call and its result, in Ollama's shape (arguments an object,
    # the result named by tool), reaches llama-server as OpenAI's and is answered.
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        {"role": "tool", "content": "3", "tool_name": "add"},
    ]
    reply = client(swapper).chat(
        model="tiny-a", messages=history, tools=[add], stream=False, options={"num_predict": 2}
    )
    assert reply.done is True and reply.eval_count == 2


def long_swapper(swapper_factory: Any) -> SwapperProcess:
    """One slot and a long context: a 16000-token answer takes many seconds here."""
    process: SwapperProcess = swapper_factory(
        models={
            "tiny-a": {
                "backend": "llamacpp",
                "model_path": str(swapper_factory.workdir / "tiny-a.gguf"),
                "ctx_size": 16384,
                "args": ["-np", "1"],
            }
        }
    )
    return process


def backend_cancelled(swapper: SwapperProcess) -> bool:
    lines = swapper.http.get("/models/tiny-a/logs", params={"lines": 1000}).json()["lines"]
    return any("cancel task" in line for line in lines)


LONG = {"model": "tiny-a", "messages": MESSAGES, "options": {"num_predict": 16000}}


def test_a_client_leaving_a_stream_cancels_the_generation(swapper_factory: Any) -> None:
    swapper = long_swapper(swapper_factory)
    with httpx.Client(base_url=swapper.url, timeout=30) as http:
        with http.stream("POST", "/api/chat", json=LONG) as response:
            lines = response.iter_lines()  # keep a reference: a dropped iterator hangs up
            assert '"done":false' in next(lines)
            assert swapper.model("tiny-a")["in_flight"] == 1
    wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 0, 10, "in_flight to drop")
    wait_until(lambda: backend_cancelled(swapper), 10, "llama-server to cancel the task")


def test_a_client_leaving_a_whole_answer_cancels_the_generation(swapper_factory: Any) -> None:
    swapper = long_swapper(swapper_factory)
    body = json.dumps({**LONG, "prompt": "hi", "stream": False}).encode()
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", swapper.port)) as sock:
        sock.sendall(head + body)
        wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 1, 30, "the request to start")
    # Hung up long before 16000 tokens: the generation is cancelled and the slot freed.
    wait_until(lambda: swapper.model("tiny-a")["in_flight"] == 0, 10, "in_flight to drop")
    wait_until(lambda: backend_cancelled(swapper), 10, "llama-server to cancel the task")


def test_ps_reports_the_vram_nvml_measures(swapper_factory: Any, tmp_path: Path) -> None:
    # The fake pynvml on swapper's path reads a fake GPU on which this test makes the real
    # llama-server's pid hold 1234 MiB: what NVML would report for a CUDA build.
    directory = tmp_path / "gpu"
    fakegpu.setup(directory, total_mb=16384, release_lag=0)
    swapper = swapper_factory(
        env={"SWAPPER_FAKE_GPU_DIR": str(directory), "PYTHONPATH": str(FAKES / "nvml")}
    )
    c = client(swapper)
    c.chat(model="tiny-a", messages=MESSAGES, stream=False, options={"num_predict": 1})
    fakegpu.hold(1234, directory, pid=swapper.model("tiny-a")["pid"])
    running = c.ps().models
    assert [m.model for m in running] == ["tiny-a:latest"]
    assert running[0].size_vram == 1234 * 1024 * 1024
    assert running[0].size == 1234 * 1024 * 1024  # more than the file: what it takes loaded


def test_images_reach_the_backend_as_image_parts(swapper: SwapperProcess) -> None:
    # A 1x1 PNG. The tiny model has no vision projector, so llama-server refuses the image part
    # with its own words, which arrive in Ollama's shape; a text-only chat would be answered.
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    with pytest.raises(ollama.ResponseError) as refused:
        client(swapper).chat(
            model="tiny-a",
            messages=[{"role": "user", "content": "what is this?", "images": [png]}],
            stream=False,
            options={"num_predict": 1},
        )
    assert refused.value.status_code == 500  # llama-server's status, passed on
    assert "image input is not supported" in refused.value.error
