"""Loading feedback: a stream that must wait for its model says so while it waits.

The 200 and the SSE headers go out at once; every ``loading_feedback_interval`` seconds the
client gets an SSE comment (``comments``) or a reasoning delta a chat UI shows (``reasoning``),
which also resets its read timeout; then the backend's stream follows unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
from litestar.datastructures import State
from litestar.types import Scope

from swapper.errors import SwapperError
from swapper.http.exchange import Exchange, Forward
from swapper.http.logs import note_stream_error
from swapper.http.responses import GuardedStream, error_event, sse_comment, sse_event
from swapper.scheduling.coordinator import Lease
from swapper.scheduling.model_state import Waiter
from swapper.upstream.client import normalise_error

__all__ = ["loading_stream"]


def _progress(mode: str, model_id: str, elapsed: float) -> bytes:
    """One loading-progress event: an SSE comment, or a reasoning delta Open WebUI shows."""
    if mode == "comments":
        return sse_comment(f"loading {model_id} {elapsed:.1f}s")
    return sse_event(
        {
            "id": "swapper-loading",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": None,
                    "delta": {
                        "role": "assistant",
                        "reasoning_content": f"Loading {model_id}… {elapsed:.0f}s\n",
                    },
                }
            ],
        }
    )


def loading_stream(
    state: State, scope: Scope, forward: Forward, mode: str, ticket: Lease | Waiter
) -> GuardedStream:
    """The SSE response for a stream whose model is not resident yet (``ticket``: its place
    in the queue); ``mode`` is ``comments`` or ``reasoning``."""
    exchange = Exchange(state, scope, forward, ticket)
    interval = state.config.swapper.loading_feedback_interval
    return GuardedStream(_loading_then_relay(exchange, scope, mode, interval), exchange.close)


async def _loading_then_relay(
    exchange: Exchange, scope: Scope, mode: str, interval: float
) -> AsyncIterator[bytes]:
    """Progress every ``interval`` seconds until the backend answers, then its stream; a load
    that fails ends the stream with an error event."""
    model_id = exchange.forward.model_id
    started = time.perf_counter()
    opening = exchange.start()
    relay: AsyncIterator[bytes] | None = None
    try:
        while not (await asyncio.wait({opening}, timeout=interval))[0]:
            yield _progress(mode, model_id, time.perf_counter() - started)
        try:
            opening.result()
        except SwapperError as exc:
            await exchange.close()
            note_stream_error(scope)
            yield error_event(exc.message, code=exc.code or "backend_error", kind=exc.error_type)
            return
        content, upstream = exchange.content, exchange.upstream
        if content is not None and upstream is not None:  # the backend refused the request
            await exchange.close()
            error = msgspec.json.decode(normalise_error(upstream.status, content))["error"]
            note_stream_error(scope)
            yield error_event(error["message"], code=error["code"], kind=error["type"])
            return
        relay = exchange.relay()
        async for chunk in relay:
            yield chunk
    finally:
        if relay is not None:
            await relay.aclose()  # type: ignore[attr-defined]  # (an async generator)
        await exchange.close()
