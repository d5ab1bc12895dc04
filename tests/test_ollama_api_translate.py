"""Ollama requests to OpenAI bodies and OpenAI answers back: the pure translation functions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from swapper.http.ollama.answers import StreamTranslator, chat_answer
from swapper.http.ollama.translate import (
    OllamaRequestError,
    chat_request,
    embed_request,
    generate_request,
    keep_alive_seconds,
    options_fields,
)

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        ("0", 0.0),
        (300, 300.0),
        (2.5, 2.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("300", 300.0),
        (-1, -1.0),
        ("-1", -1.0),
        ("-5m", -1.0),
    ],
)
def test_keep_alive_forms(value: Any, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "", "5x", True, [], {"a": 1}])
def test_keep_alive_refuses_what_is_no_duration(value: Any) -> None:
    with pytest.raises(OllamaRequestError, match="keep_alive"):
        keep_alive_seconds(value)


def test_options_map_to_openai_fields() -> None:
    options = {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "stop": ["\n"],
        "num_predict": 16,
        "repeat_penalty": 1.1,
        "num_ctx": 512,
        "num_gpu": 99,  # how to load: a running backend ignores it
    }
    assert options_fields(options, 512) == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "stop": ["\n"],
        "max_tokens": 16,
        "repeat_penalty": 1.1,
    }
    assert options_fields({"num_predict": -1}, None) == {}  # -1: no limit, OpenAI's default


def test_num_ctx_larger_than_ctx_size_is_a_clear_error() -> None:
    with pytest.raises(OllamaRequestError, match=r"num_ctx 4096 .*ctx_size"):
        options_fields({"num_ctx": 4096}, 2048)
    assert options_fields({"num_ctx": 4096}, None) == {}  # no ctx_size: the model's own


def test_options_ollama_would_ignore_are_dropped() -> None:
    # Ollama logs and ignores options it does not know; older clients still send some.
    assert options_fields({"tfs_z": 1.0, "penalize_newline": True, "wat": 1}, None) == {}
    with pytest.raises(OllamaRequestError, match="options"):
        options_fields([1], None)


def test_chat_streams_by_default_and_asks_for_usage() -> None:
    body = chat_request({"model": "x", "messages": HI}, "tiny-a", None)
    assert body == {
        "model": "tiny-a",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": HI,
    }
    assert "stream_options" not in chat_request({"messages": HI, "stream": False}, "m", None)


def test_format_json_and_schema_become_response_format() -> None:
    body = chat_request({"messages": HI, "format": "json"}, "m", None)
    assert body["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat_request({"messages": HI, "format": schema}, "m", None)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == schema
    with pytest.raises(OllamaRequestError, match="format"):
        chat_request({"messages": HI, "format": "yaml"}, "m", None)


def test_tools_and_tool_calls_map_both_ways() -> None:
    tool = {
        "type": "function",
        "function": {"name": "add", "parameters": {"type": "object", "properties": {}}},
    }
    request = {
        "messages": [
            *HI,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
            },
            {"role": "tool", "content": "3", "tool_name": "add"},
        ],
        "tools": [tool],
    }
    body = chat_request(request, "m", None)
    assert body["tools"] == [tool]
    call = body["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}  # a JSON string
    assert body["messages"][2] == {"role": "tool", "content": "3", "tool_call_id": call["id"]}
    answer = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "add", "arguments": '{"a":1,"b":2}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9},
    }
    out = chat_answer(answer, "m:latest", generate=False, total_ns=10, load_ns=0)
    assert out["message"]["tool_calls"] == [
        {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    ]
    assert out["done"] is True and out["done_reason"] == "stop"
    assert (out["prompt_eval_count"], out["eval_count"]) == (5, 9)


def test_tool_results_are_paired_with_their_calls_by_name_then_order() -> None:
    def call(name: str) -> dict[str, Any]:
        return {"function": {"name": name, "arguments": {}}}

    messages = [
        *HI,
        {"role": "assistant", "content": "", "tool_calls": [call("a"), call("b"), call("a")]},
        {"role": "tool", "content": "B", "tool_name": "b"},
        {"role": "tool", "content": "A1"},
        {"role": "tool", "content": "A2", "tool_name": "a"},
    ]
    sent = chat_request({"messages": messages}, "m", None)["messages"]
    ids = [c["id"] for c in sent[1]["tool_calls"]]
    assert len(set(ids)) == 3
    assert [m["tool_call_id"] for m in sent[2:]] == [ids[1], ids[0], ids[2]]
    assert all("_tool_name" not in m for m in sent)


def test_images_become_image_parts() -> None:
    body = chat_request({"messages": [{**HI[0], "images": ["aGk="]}]}, "m", None)
    content = body["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "hi"}
    assert content[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}
    with pytest.raises(OllamaRequestError, match="images"):
        chat_request({"messages": [{**HI[0], "images": [1]}]}, "m", None)


def test_think_maps_to_the_backends_reasoning_switches() -> None:
    on = chat_request({"messages": HI, "think": True}, "m", None)
    assert on["chat_template_kwargs"] == {"enable_thinking": True}
    assert chat_request({"messages": HI, "think": "high"}, "m", None)["reasoning_effort"] == "high"
    answer = {
        "choices": [
            {
                "message": {"content": "4", "reasoning_content": "2+2"},
                "finish_reason": "stop",
            }
        ]
    }
    out = chat_answer(answer, "m", generate=True, total_ns=1, load_ns=0)
    assert (out["response"], out["thinking"]) == ("4", "2+2")


def test_generate_is_a_chat_turn_or_with_raw_a_completion() -> None:
    path, body = generate_request({"prompt": "hi", "system": "be brief"}, "m", None)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    path, body = generate_request({"prompt": "hi", "raw": True, "stream": False}, "m", None)
    assert (path, body) == ("/v1/completions", {"model": "m", "stream": False, "prompt": "hi"})
    with pytest.raises(OllamaRequestError, match="suffix"):
        generate_request({"prompt": "def f(", "suffix": "return 1"}, "m", None)


def test_embed_requests() -> None:
    assert embed_request({"input": "a"}, "m", legacy=False)["input"] == ["a"]
    assert embed_request({"prompt": "a"}, "m", legacy=True)["input"] == ["a"]
    with pytest.raises(OllamaRequestError, match="input"):
        embed_request({"input": []}, "m", legacy=False)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def test_stream_translation_of_sse_chunks_split_anywhere() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    stream = b": ping\n\n" + sse(
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "add", "arguments": '{"a"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
        chunk({}, "length"),
        {
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            "timings": {"prompt_ms": 1.5, "predicted_ms": 2.0},
        },
    )
    translator = StreamTranslator("m:latest", generate=False)
    out = b""
    for i in range(0, len(stream), 7):  # chunk boundaries fall mid-line
        out += translator.feed(stream[i : i + 7])
    out += translator.finish(total_ns=9, load_ns=4)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["message"]["content"] for line in lines] == ["Hel", "lo", ""]
    assert [line["done"] for line in lines] == [False, False, True]
    last = lines[-1]
    assert last["done_reason"] == "length"
    assert last["message"]["tool_calls"] == [{"function": {"name": "add", "arguments": {"a": 1}}}]
    assert (last["prompt_eval_count"], last["eval_count"]) == (3, 2)
    assert (last["prompt_eval_duration"], last["eval_duration"]) == (1_500_000, 2_000_000)
    assert (last["total_duration"], last["load_duration"]) == (9, 4)


def test_an_error_event_ends_the_stream_with_an_error_line() -> None:
    translator = StreamTranslator("m", generate=True)
    out = translator.feed(
        sse({"choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "boom"}})
    )
    assert json.loads(out)["response"] == "a"
    assert json.loads(translator.finish(total_ns=1, load_ns=0)) == {"error": "boom"}
