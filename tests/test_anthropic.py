"""Anthropic's Messages API through swapper: the official ``anthropic`` SDK against a real
llama-server (whose build answers ``/v1/messages`` and ``/v1/messages/count_tokens``)."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.conftest import SwapperProcess

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi"}]


def _client(swapper: SwapperProcess, key: str = "none") -> anthropic.Anthropic:
    # base_url is the server root: the SDK adds /v1/messages itself.
    return anthropic.Anthropic(base_url=swapper.url, api_key=key, max_retries=0)


def test_messages_stream_and_count_tokens_through_an_alias(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    client = _client(swapper)
    assert swapper.model("tiny-a")["status"] == "UNLOADED"

    message = client.messages.create(model="a", max_tokens=4, messages=HI)
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "tiny-a"  # swapper's id, though the client named an alias
    assert message.stop_reason == "max_tokens"  # the tiny model never stops on its own
    assert message.usage.output_tokens == 4
    assert message.content[0].type == "text" and isinstance(message.content[0].text, str)
    assert swapper.model("tiny-a")["status"] == "LOADED"

    with client.messages.stream(model="tiny-a", max_tokens=3, messages=HI) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert final.model == "tiny-a" and final.usage.output_tokens == 3

    counted = client.messages.count_tokens(model="a", messages=HI)
    assert counted.input_tokens > 0
    # The same prompt as the message above: the backend counted the same tokens.
    assert counted.input_tokens == message.usage.input_tokens


def test_errors_raise_the_sdks_own_classes(swapper_factory: Any) -> None:
    swapper = swapper_factory(server={"api_keys": ["user-key"]})
    swapper.http.headers["x-api-key"] = "user-key"
    client = _client(swapper, "user-key")

    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=2, messages=HI)
    assert missing.value.status_code == 404
    assert missing.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model 'no-such-model' does not exist"},
    }
    assert swapper.model("tiny-a")["status"] == "UNLOADED"

    with pytest.raises(anthropic.AuthenticationError) as refused:
        _client(swapper, "wrong-key").messages.count_tokens(model="a", messages=HI)
    assert refused.value.body["error"]["type"] == "authentication_error"

    # An error of the backend's own (llama-server refuses a string max_tokens) in Anthropic's
    # shape, with its status.
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(
            model="a",
            max_tokens=2,
            messages=HI,
            extra_body={"max_tokens": "x"},  # (the SDK's own parameter must be an int)
        )
    assert bad.value.body["type"] == "error"
    error = bad.value.body["error"]
    assert set(error) == {"type", "message"}
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]

    # swapper's own refusal of a body it cannot route, in the same shape.
    reply = swapper.http.post(
        "/v1/messages", content=b"{", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400
    assert reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "invalid_request_error"
