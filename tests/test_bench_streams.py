"""A short, ratio-based version of `just bench`'s stream comparison, as a regression check.

32 concurrent 32-token streams straight to llama-server and through swapper, in the same run:
swapper must deliver at least half the direct events per second. Nothing here is an absolute
time; both sides share the machine and its noise, and each is measured twice, the better kept.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.conftest import MESSAGES, tiny_model

pytestmark = pytest.mark.integration

STREAMS = 32
TOKENS = 32


async def _events_per_second(url: str, body: dict[str, Any]) -> tuple[float, list[int]]:
    """``STREAMS`` concurrent streams to ``url``: events/s, and the data events of each."""
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one() -> int:
            events, last = 0, ""
            async with client.stream("POST", url, json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if line:
                        events += line.startswith("data: ")
                        last = line
            assert last == "data: [DONE]"
            return events

        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(STREAMS)))
        return sum(counts) / (time.perf_counter() - started), counts


def test_streams_through_swapper_keep_at_least_half_the_direct_rate(swapper_factory: Any) -> None:
    swapper = swapper_factory(
        models={"tiny-a": tiny_model(swapper_factory.workdir, "a", ctx_size=512)}
    )
    assert swapper.http.post("/models/tiny-a/load").status_code == 200
    port = swapper.model("tiny-a")["port"]
    body = {"messages": MESSAGES, "max_tokens": TOKENS, "stream": True, "ignore_eos": True}
    direct = f"http://127.0.0.1:{port}/v1/chat/completions"
    via = f"{swapper.url}/v1/chat/completions"
    routed = {**body, "model": "tiny-a"}

    async def compare() -> tuple[list[float], list[float], list[int]]:
        await _events_per_second(via, routed)  # warm both paths
        direct_rates, via_rates, counts = [], [], []
        for _ in range(2):
            rate, _ = await _events_per_second(direct, body)
            direct_rates.append(rate)
            rate, counts = await _events_per_second(via, routed)
            via_rates.append(rate)
        return direct_rates, via_rates, counts

    direct_rates, via_rates, counts = asyncio.run(compare())
    # Every stream through swapper carries every token (role, 32 tokens, the end, [DONE]).
    assert len(set(counts)) == 1 and counts[0] >= TOKENS, counts
    ratio = max(via_rates) / max(direct_rates)
    assert ratio >= 0.5, (
        f"swapper delivered {ratio:.2f}x the direct events/s at {STREAMS} streams "
        f"(direct {direct_rates}, swapper {via_rates})"
    )
