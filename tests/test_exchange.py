"""An Exchange gives back its lease exactly once and closes its upstream, however it ends.

In-process, on fake backends: every release of an in-flight slot is counted at the coordinator,
and a fake upstream response records how often it was closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from swapper.errors import BackendFailure, BackendTimeout
from swapper.http.exchange import Exchange, Forward
from swapper.http.loading import loading_stream
from swapper.scheduling.coordinator import SwapCoordinator
from swapper.scheduling.model_state import Waiter
from tests.conftest import CoordinatorFactory

pytestmark = pytest.mark.anyio

BODY = b'{"model": "a", "messages": []}'
EVENTS = [b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n', b"data: [DONE]\n\n"]


class FakeResponse:
    """An upstream response: a stream of ``chunks`` (a BackendFailure after them if ``broken``),
    or a JSON body; records every close."""

    def __init__(self, *, stream: bool = True, status: int = 200, broken: bool = False) -> None:
        self.status = status
        self.content_type = "text/event-stream" if stream else "application/json"
        self.is_stream = stream
        self.broken = broken
        self.closes = 0

    async def read(self) -> bytes:
        self.closes += 1  # (UpstreamResponse.read closes the response itself)
        return b'{"model": "a", "choices": []}'

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        for chunk in EVENTS:
            yield chunk
        if self.broken:
            raise BackendFailure("Backend for 'a' broke the connection: reset")

    async def aclose(self) -> None:
        self.closes += 1


class FakeUpstream:
    """The upstream client: answers each send with the next of ``answers`` (a response, an
    exception to raise, or None: never answer)."""

    def __init__(self, *answers: FakeResponse | Exception | None) -> None:
        self.answers = list(answers)
        self.sent = asyncio.Event()

    async def send(self, *args: Any, **kwargs: Any) -> FakeResponse:
        self.sent.set()
        answer = self.answers.pop(0)
        if answer is None:
            await asyncio.Event().wait()
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, FakeResponse)
        return answer


class Releases:
    """Counts the coordinator's releases of in-flight slots, per model."""

    def __init__(self, coordinator: SwapCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        release = coordinator.release

        def counted(model: Any, *, used: bool = True) -> None:
            self.count += 1
            release(model, used=used)

        monkeypatch.setattr(coordinator, "release", counted)


def _state(coordinator: SwapCoordinator, upstream: FakeUpstream) -> Any:
    histogram = SimpleNamespace(observe=lambda seconds: None)
    metrics = SimpleNamespace(ttfb=SimpleNamespace(labels=lambda model: histogram))
    swapper = SimpleNamespace(loading_feedback_interval=0.05)
    return SimpleNamespace(
        coordinator=coordinator,
        upstream=upstream,
        metrics=metrics,
        stopping=asyncio.Event(),
        config=SimpleNamespace(swapper=swapper),
        catalog=SimpleNamespace(shaping={}),  # (H3, issue 11: models' request shaping; none)
    )


def _in_flight(coordinator: SwapCoordinator) -> int:
    return coordinator.status().models["a"].in_flight


@pytest.fixture
async def coordinator(coordinator_factory: CoordinatorFactory) -> SwapCoordinator:
    coordinator = coordinator_factory()
    await coordinator.load("a")  # resident: every exchange below is admitted at once
    return coordinator


def _exchange(
    coordinator: SwapCoordinator, upstream: FakeUpstream, *, stream: bool = True, ticket: Any = None
) -> Exchange:
    forward = Forward("/v1/chat/completions", BODY, "a", "a", stream)
    return Exchange(_state(coordinator, upstream), {"type": "http"}, forward, ticket)


async def test_close_is_idempotent(
    coordinator: SwapCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases = Releases(coordinator, monkeypatch)
    response = FakeResponse()
    exchange = _exchange(coordinator, FakeUpstream(response))
    await exchange.open()
    assert _in_flight(coordinator) == 1
    await exchange.close()
    await exchange.close()
    async with exchange:  # (and leaving an ``async with`` closes it once more)
        pass
    assert (releases.count, response.closes, _in_flight(coordinator)) == (1, 1, 0)


async def test_an_answer_read_whole_releases_at_once(
    coordinator: SwapCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases = Releases(coordinator, monkeypatch)
    response = FakeResponse(stream=False)
    async with _exchange(coordinator, FakeUpstream(response), stream=False) as exchange:
        await exchange.open()
        assert exchange.content is not None
        assert (releases.count, response.closes) == (1, 1)  # before the client has it
    assert (releases.count, response.closes, _in_flight(coordinator)) == (1, 1, 0)


@pytest.mark.parametrize("end", ["whole", "client_left", "upstream_broke"])
async def test_a_relayed_stream_releases_once_however_it_ends(
    coordinator: SwapCoordinator, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    releases = Releases(coordinator, monkeypatch)
    response = FakeResponse(broken=end == "upstream_broke")
    exchange = _exchange(coordinator, FakeUpstream(response))
    await exchange.open()
    relay = exchange.relay()
    chunks = [await relay.__anext__()]
    if end == "client_left":
        await relay.aclose()  # type: ignore[attr-defined]
    else:
        chunks += [chunk async for chunk in relay]
    await exchange.close()  # the stream guard's cleanup runs after the relay's own
    assert (releases.count, response.closes, _in_flight(coordinator)) == (1, 1, 0)
    if end == "upstream_broke":
        assert b'"code":"backend_error"' in chunks[-1]


async def test_a_stream_guard_closes_a_relay_that_never_ran(
    coordinator: SwapCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases = Releases(coordinator, monkeypatch)
    response = FakeResponse()
    exchange = _exchange(coordinator, FakeUpstream(response))
    await exchange.open()
    guarded = exchange.response()
    await guarded.cleanup()  # what the guard runs when Litestar cancels before iterating
    assert (releases.count, response.closes, _in_flight(coordinator)) == (1, 1, 0)


@pytest.mark.parametrize("error", [BackendFailure("broke"), BackendTimeout("silent")])
async def test_an_upstream_error_before_the_answer_releases_once(
    coordinator: SwapCoordinator, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    releases = Releases(coordinator, monkeypatch)
    exchange = _exchange(coordinator, FakeUpstream(error))
    with pytest.raises(type(error)):
        async with exchange:
            await exchange.open()
    assert (releases.count, _in_flight(coordinator)) == (1, 0)


async def test_closing_while_the_request_is_sent_cancels_it_and_releases_once(
    coordinator: SwapCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases = Releases(coordinator, monkeypatch)
    upstream = FakeUpstream(None)
    exchange = _exchange(coordinator, upstream)
    opening = exchange.start()
    await upstream.sent.wait()
    assert _in_flight(coordinator) == 1
    # The client went away: close() must cancel the send, not wait for an answer that never comes.
    closing = asyncio.ensure_future(exchange.close())
    done, _ = await asyncio.wait({closing}, timeout=30)  # (wait_for would cancel it for us)
    closing.cancel()
    assert done, "close() waited for the send instead of cancelling it"
    assert opening.cancelled()
    assert (releases.count, _in_flight(coordinator)) == (1, 0)


async def test_a_queue_place_never_used_is_given_back(
    coordinator_factory: CoordinatorFactory,
) -> None:
    coordinator = coordinator_factory()
    ticket = coordinator.enqueue("a")  # not resident: a place in the queue
    assert isinstance(ticket, Waiter)
    await _exchange(coordinator, FakeUpstream(), ticket=ticket).close()
    assert coordinator.status().models["a"].queued == 0


async def test_loading_feedback_then_the_stream_then_one_release(
    coordinator_factory: CoordinatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = coordinator_factory()
    releases = Releases(coordinator, monkeypatch)
    response = FakeResponse()
    state = _state(coordinator, FakeUpstream(response))
    forward = Forward("/v1/chat/completions", BODY, "a", "a", True)
    stream = loading_stream(state, {"type": "http"}, forward, "reasoning", coordinator.enqueue("a"))
    chunks = [chunk async for chunk in stream.iterator]
    await stream.cleanup()
    assert chunks[-2:] == EVENTS
    for chunk in chunks[:-2]:  # progress while the model loaded, if the load took that long
        delta = msgspec.json.decode(chunk.removeprefix(b"data: "))["choices"][0]["delta"]
        assert delta["reasoning_content"].startswith("Loading a")
    assert (releases.count, response.closes, _in_flight(coordinator)) == (1, 1, 0)
