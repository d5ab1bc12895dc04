"""The floor for a proxy's added latency: a plain TCP byte relay, nothing parsed.

``python scripts/relay_floor.py LISTEN_PORT UPSTREAM_PORT`` relays every connection on
127.0.0.1:LISTEN_PORT to 127.0.0.1:UPSTREAM_PORT, byte for byte, on uvloop when it is installed.
``just bench`` runs it beside swapper: whatever swapper adds beyond what this adds is the cost
of being an HTTP proxy that routes, swaps and accounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.write_eof()


async def relay(
    upstream_port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    """One client connection: one upstream connection, bytes both ways."""
    try:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))
    for writer in (up_w, client_w):
        writer.close()


async def main(listen_port: int, upstream_port: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(upstream_port, r, w), "127.0.0.1", listen_port
    )
    print(f"relaying 127.0.0.1:{listen_port} -> 127.0.0.1:{upstream_port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # still a floor, only a higher one
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(main(int(sys.argv[1]), int(sys.argv[2])))
