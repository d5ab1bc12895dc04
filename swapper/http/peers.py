"""Requests for a peer's model: found in one place, forwarded as they are.

Every route that reads a ``model`` asks :func:`route_to_peer` first; when it names a peer, the
request goes there with :func:`forward_to_peer`: the body as the client sent it (uploads as
they arrive), the answer relayed as the peer sends it (streams, with the peer's own loading
comments, as the bytes arrive). The peer's key replaces the client's, and the hop header marks
the request so that the peer never forwards it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.datastructures import State

from swapper.errors import BackendFailure, ModelNotFound
from swapper.http.anthropic import anthropic_error_event
from swapper.http.disconnect import client_left_first
from swapper.http.logs import note_model, note_stream_error
from swapper.http.responses import JSON, GuardedStream, error_event
from swapper.peers.directory import HOP_HEADER, Peer, PeerDirectory
from swapper.upstream.client import UpstreamResponse

__all__ = [
    "PeerForward",
    "came_from_peer",
    "forward_ollama_to_peer",
    "forward_to_peer",
    "peer_model",
    "peer_models",
    "peer_tags",
    "route_to_peer",
]

logger = logging.getLogger("swapper")

_DECODE = msgspec.json.Decoder()
#: Ollama's endpoints that answer in NDJSON lines unless the body says ``"stream": false``.
_OLLAMA_STREAMS = ("/api/chat", "/api/generate")

#: Headers of the peer's answer passed on to the client besides its Content-Type.
_ANSWER_HEADERS = (b"retry-after", b"retry-after-ms", b"x-should-retry")


class PeerForward(msgspec.Struct, frozen=True):
    """A request to send a peer as it came: ``path`` there, this body, these headers."""

    path: str
    #: The JSON body, or an upload's chunks as they arrive.
    body: bytes | AsyncIterable[bytes]
    model: str
    stream: bool = False
    #: The shape of an error that breaks a stream: ``openai``, ``anthropic`` or ``raw``.
    dialect: str = "openai"
    method: str = "POST"
    #: The client's headers the peer needs too (``anthropic-version``...).
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: An upload's Content-Type (with its boundary); None: JSON.
    content_type: bytes | None = None
    #: An upload's length; None: known from the body, or sent chunked.
    content_length: int | None = None
    #: The client's body is read: a client that leaves cancels the request. (While an upload
    #: is relayed, its body stream notices that itself.)
    watch_disconnect: bool = True


def came_from_peer(request: Request[Any, Any, State]) -> bool:
    """True for a request another swapper forwarded here."""
    return HOP_HEADER in request.headers


def route_to_peer(request: Request[Any, Any, State], name: str) -> Peer | None:
    """The peer that serves the model ``name`` for this request, or None.

    None when ``name`` is a local model (a local id or alias wins), when the request came from
    a peer (never forwarded twice: a model no node has is a 404 at the second, not a loop), or
    when no peer serves it. Every route calls this before resolving the model locally.
    """
    state = request.app.state
    peers: PeerDirectory | None = state.get("peers")
    if peers is None or not peers.peers or name in state.config.names:
        return None
    if came_from_peer(request):
        return None
    return peers.owner(name)


def peer_models(request: Request[Any, Any, State]) -> list[dict[str, Any]]:
    """The peers' ``/v1/models`` entries for this request (local ids included: the catalog
    leaves those out); none for one from a peer."""
    peers: PeerDirectory | None = request.app.state.get("peers")
    if peers is None or came_from_peer(request):
        return []
    return peers.entries()


def peer_tags(request: Request[Any, Any, State]) -> list[dict[str, Any]]:
    """The peers' Ollama ``/api/tags`` entries for this request, less local models; none for
    one from a peer."""
    peers: PeerDirectory | None = request.app.state.get("peers")
    if peers is None or came_from_peer(request):
        return []
    return peers.tag_entries(request.app.state.config.names)


def peer_model(request: Request[Any, Any, State], name: str) -> dict[str, Any]:
    """The ``/v1/models/{name}`` entry of a peer's model; ModelNotFound if no peer lists it."""
    for entry in peer_models(request):
        if entry["id"] == name:
            return entry
    raise ModelNotFound(f"The model {name!r} does not exist")


async def forward_ollama_to_peer(
    request: Request[Any, Any, State], path: str
) -> Response[Any] | None:
    """For Ollama's routes (``path`` is theirs, e.g. ``/api/chat``): the peer's own answer when
    the body names a peer's model (``model``, or ``name`` as old clients send; with or without
    ``:latest``), else None and the route serves the request here (and checks the body)."""
    body = await request.body()  # (Litestar keeps it: the route reads it again)
    try:
        data = _DECODE.decode(body)
    except msgspec.DecodeError:
        return None
    name = (data.get("model") or data.get("name")) if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        return None
    for candidate in dict.fromkeys((name, name.removesuffix(":latest"))):
        peer = route_to_peer(request, candidate)
        if peer is not None:
            stream = path in _OLLAMA_STREAMS and data.get("stream", True) is not False
            onward = PeerForward(path, body, candidate, stream, dialect="raw")
            return await forward_to_peer(request, peer, onward)
    return None


async def _send(peer: Peer, forward: PeerForward) -> UpstreamResponse:
    return await peer.client.send(
        f"peer {peer.name}",
        peer.base_url,
        forward.path,
        forward.body,
        keep_alive=not forward.stream,
        method=forward.method,
        headers=(*forward.headers, *peer.headers()),
        content_type=forward.content_type,
        content_length=forward.content_length,
    )


async def forward_to_peer(
    request: Request[Any, Any, State], peer: Peer, forward: PeerForward
) -> Response[Any]:
    """Send ``forward`` to ``peer`` and relay its answer: a 503 naming the peer, at once,
    while it is known down; a 499 if the client leaves first."""
    note_model(request.scope, forward.model)
    if peer.up is False:
        raise peer.unavailable()
    opening = asyncio.ensure_future(_send(peer, forward))
    if await client_left_first(request, opening, watch=forward.watch_disconnect):
        logger.info(
            "client went away; request for %s on peer %s cancelled", forward.model, peer.name
        )
        return Response(b"", status_code=499)
    try:
        upstream = opening.result()
    except BackendFailure as exc:
        # No byte came back: the peer is gone (or hung). Later requests hear it at once.
        peer.mark_down(exc.message)
        raise peer.unavailable(exc.message) from None
    headers = _answer_headers(upstream)
    if upstream.status == 404:
        peer.wake.set()  # its model list may have changed: read it again now
    if upstream.status == 200 and (upstream.is_stream or forward.stream):
        stream = GuardedStream(
            _relay(request, peer, forward, upstream),
            upstream.aclose,
            status=upstream.status,
            media_type=upstream.content_type or JSON,
        )
        stream.headers.update(headers)
        return stream
    try:
        content = await upstream.read()
    except BackendFailure as exc:
        peer.mark_down(exc.message)
        raise peer.unavailable(exc.message) from None
    return Response(
        content,
        status_code=upstream.status,
        media_type=upstream.content_type or JSON,
        headers=headers,
    )


def _answer_headers(upstream: UpstreamResponse) -> dict[str, str]:
    found = {}
    for name in _ANSWER_HEADERS:
        value = upstream.header(name)
        if value is not None:
            found[name.decode()] = value.decode("latin-1")
    return found


async def _relay(
    request: Request[Any, Any, State], peer: Peer, forward: PeerForward, upstream: UpstreamResponse
) -> AsyncIterator[bytes]:
    """The peer's bytes as they arrive; a peer that breaks off ends the stream with an error
    event in the client's dialect."""
    try:
        async for chunk in upstream.iter_bytes():
            yield chunk
    except BackendFailure as exc:
        message = f"The peer {peer.name!r} broke off the stream: {peer.scrub(exc.message)}"
        logger.warning("%s", message)
        if upstream.is_stream and forward.dialect != "raw":
            note_stream_error(request.scope)
            if forward.dialect == "anthropic":
                yield anthropic_error_event(message)
            else:
                yield error_event(message, code="peer_unavailable")
    finally:
        await upstream.aclose()
