"""The lean loopback client (swapper/upstream/network.py) against real sockets on loopback.

Each test runs a small HTTP/1.1 server of its own on 127.0.0.1 that misbehaves on purpose:
closing a kept-alive connection as it is reused, holding answers, trickling a body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from swapper.errors import BackendFailure, BackendUnreachable
from swapper.upstream.client import UpstreamClient

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body), or b"" at EOF."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server calling ``handler`` per connection (numbered from 0); yields its URL
    and the list of connection numbers seen."""
    seen: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(seen)
        seen.append(number)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await handler(reader, writer, number)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def test_a_reused_connection_closed_before_answering_is_retried_on_a_new_one() -> None:
    # The keep-alive race: the backend closes an idle connection just as swapper reuses it.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _request(reader)
        writer.write(OK)  # kept alive (HTTP/1.1 default)...
        if n == 0:
            await _request(reader)  # ...but the second request on it is never answered
            return
        while await _request(reader):
            writer.write(OK)

    client = UpstreamClient()
    async with _server(handler) as (url, seen):
        for _ in range(3):
            response = await client.send("m", url, "/v1/x", b"{}")
            assert (response.status, await response.read()) == (200, b"{}")
        assert seen == [0, 1]  # the retry opened one new connection, which is kept
    await client.aclose()


async def test_a_new_connection_closed_before_answering_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _request(reader)  # and hang up without a word

    client = UpstreamClient()
    async with _server(handler) as (url, seen):
        with pytest.raises(BackendUnreachable, match="without sending a response"):
            await client.send("m", url, "/v1/x", b"{}")
        assert seen == [0]
    await client.aclose()


async def test_a_refused_connection_is_unreachable() -> None:
    async with _server(lambda r, w, n: asyncio.sleep(0)) as (url, _):
        pass  # closed: nothing listens on its port now
    client = UpstreamClient()
    with pytest.raises(BackendUnreachable, match="refused the connection"):
        await client.send("m", url, "/v1/x", b"{}")
    await client.aclose()


async def test_requests_beyond_the_limit_queue_without_extra_connections() -> None:
    release = asyncio.Event()
    both_open = asyncio.Event()
    open_now = [0, 0]  # now, most

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        open_now[0] += 1
        open_now[1] = max(open_now[1], open_now[0])
        if open_now[0] == 2:
            both_open.set()
        try:
            while await _request(reader):
                await release.wait()
                writer.write(OK)
        finally:
            open_now[0] -= 1

    client = UpstreamClient()
    async with _server(handler) as (url, seen):

        async def one() -> bytes:
            response = await client.send("m", url, "/v1/x", b"{}", max_connections=2)
            return await response.read()

        tasks = [asyncio.ensure_future(one()) for _ in range(20)]
        await both_open.wait()
        release.set()
        assert await asyncio.gather(*tasks) == [b"{}"] * 20
        assert len(seen) == 2 and open_now[1] == 2
    await client.aclose()


async def test_a_stream_arrives_in_pieces_and_closing_it_early_hangs_up() -> None:
    hung_up = asyncio.Event()
    more = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await more.wait()
        writer.write(b"7\r\ndata: 2\r\n")
        await writer.drain()
        if await reader.read(1) == b"":  # swapper closed its side
            hung_up.set()

    client = UpstreamClient()
    async with _server(handler) as (url, _):
        response = await client.send("m", url, "/v1/x", b"{}")
        assert response.is_stream
        chunks = response.iter_bytes()
        assert await anext(chunks) == b"data: 1"
        more.set()
        assert await anext(chunks) == b"data: 2"
        await response.aclose()
        await asyncio.wait_for(hung_up.wait(), 10)
    await client.aclose()


async def test_a_connection_broken_mid_body_is_a_backend_failure() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{"
        )
        await writer.drain()

    client = UpstreamClient()
    async with _server(handler) as (url, _):
        response = await client.send("m", url, "/v1/x", b"{}")
        with pytest.raises(BackendFailure, match="broke the connection") as caught:
            await response.read()
        assert not isinstance(caught.value, BackendUnreachable)  # an answer had begun
    await client.aclose()
