"""Model names on the wire: requests name the backend's model, responses swapper's id."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from swapper.http.rename import ModelRename

pytestmark = pytest.mark.anyio

RENAME = ModelRename("qwen", "qwen3:8b")


def test_the_request_names_the_backends_model_and_keeps_everything_else() -> None:
    body = json.dumps(
        {
            "model": "qwen",
            "messages": [{"role": "user", "content": "é"}],
            "x_unknown": {"kept": True},
        }
    ).encode()
    assert json.loads(RENAME.request(body, "qwen")) == {
        "model": "qwen3:8b",
        "messages": [{"role": "user", "content": "é"}],
        "x_unknown": {"kept": True},
    }


def test_a_response_names_swappers_id() -> None:
    body = b'{"id":"c1","model":"qwen3:8b","choices":[]}'
    assert json.loads(RENAME.response(body))["model"] == "qwen"
    # Ollama may answer with the normalised tag: still this backend's one model.
    assert json.loads(RENAME.response(b'{"model":"qwen3:8b-latest"}'))["model"] == "qwen"
    untouched = b'{"data":[1,2,3]}'
    assert RENAME.response(untouched) is untouched
    assert RENAME.response(b'not json "model"') == b'not json "model"'


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_a_stream_is_renamed_event_by_event_across_chunk_boundaries() -> None:
    events = [
        b'data: {"model":"qwen3:8b","choices":[{"delta":{"content":"hi"}}]}\n\n',
        b": ping\n\n",
        b'data: {"model":"qwen3:8b","choices":[],"usage":{"total_tokens":3}}\r\n\r\n',
        b"data: [DONE]\n\n",
    ]
    raw = b"".join(events)
    # Split at awkward places: inside a JSON string, between \r and \n.
    cuts = [7, 30, raw.index(b"\r\n") + 1, len(raw) - 3]
    parts = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    out = b"".join([chunk async for chunk in RENAME.stream(_chunks(*parts))])
    lines = [line for line in out.split(b"\n\n") if line]
    assert lines[0].startswith(b"data: ") and json.loads(lines[0][6:])["model"] == "qwen"
    assert lines[1] == b": ping"
    assert json.loads(lines[2][6:])["usage"] == {"total_tokens": 3}
    assert json.loads(lines[2][6:])["model"] == "qwen"
    assert lines[3] == b"data: [DONE]"
    assert b"qwen3:8b" not in out


async def test_each_event_passes_on_as_soon_as_it_is_complete() -> None:
    seen: list[bytes] = []

    async def source() -> AsyncIterator[bytes]:
        yield b'data: {"model":"qwen3:8b"}\n\ndata: {"mo'
        assert len(seen) == 1, "the first complete event must not wait for the next chunk"
        yield b'del":"qwen3:8b"}\n\n'

    async for chunk in RENAME.stream(source()):
        seen.append(chunk)
    assert len(seen) == 2


def test_a_request_already_naming_the_backends_model_passes_untouched() -> None:
    body = b'{"model": "qwen3:8b",  "messages": []}'
    assert RENAME.request(body, "qwen3:8b") is body


def test_a_body_msgspec_cannot_hold_is_a_400_not_a_500() -> None:
    from swapper.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        RENAME.request(b'{"model": "qwen", "t": 1e999}', "qwen")
