"""The OpenAI-compatible endpoints: route by ``model``, relay the backend's bytes.

Handlers stay thin: they find the model named in the body, ask the coordinator for a lease and
relay the backend's answer byte for byte, streams as they arrive.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath

from swapper.errors import InvalidRequest, UnsupportedMediaType
from swapper.http.access import require_key
from swapper.http.disconnect import client_left_first
from swapper.http.exchange import Exchange, Forward
from swapper.http.loading import loading_stream
from swapper.http.logs import note_model
from swapper.http.openapi import ChatOperation, CompletionOperation, EmbeddingOperation
from swapper.http.peers import PeerForward, forward_to_peer, peer_model, peer_models, route_to_peer
from swapper.http.responses import JSON

__all__ = [
    "OPENAI_HANDLERS",
    "content_type_accepted",
    "forward_now",
    "forward_request",
    "route_body",
]

logger = logging.getLogger("swapper")


class _Routing(msgspec.Struct):
    """The only part of a request body swapper reads; everything else passes through untouched."""

    model: str
    stream: Any = None


_ROUTING = msgspec.json.Decoder(_Routing)
_ENCODE = msgspec.json.Encoder()


def route_body(body: bytes) -> _Routing:
    """The ``model`` (and whether a stream is asked for) of a request body, or InvalidRequest."""
    try:
        # Backends choke on invalid UTF-8 anywhere in the body, not only in the fields we read.
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        routing = _ROUTING.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field `model`" in text:
            raise InvalidRequest("You must provide a model parameter", param="model") from None
        if "at `$.model`" in text:
            raise InvalidRequest("`model` must be a string", param="model") from None
        raise InvalidRequest("The request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not routing.model:
        raise InvalidRequest("`model` must not be empty", param="model")
    return routing


# -- forwarding -------------------------------------------------------------------------------


def content_type_accepted(content_type: bytes | None) -> bool:
    """True for a JSON Content-Type, or none at all (curl -d without -H, and other lax
    clients: the body is parsed as JSON anyway)."""
    if content_type is None:
        return True
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _check_content_type(request: Request[Any, Any, State]) -> None:
    content_type = request.headers.get("content-type")
    if not content_type_accepted(None if content_type is None else content_type.encode("latin-1")):
        assert content_type is not None
        media = content_type.partition(";")[0].strip().lower()
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {media!r}", code="unsupported_media_type"
        )


#: Client headers passed on to the backend on Anthropic's paths (its SDK sends these).
_ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")


async def forward_request(
    request: Request[Any, Any, State],
    path: str,
    *,
    endpoint: str | None = None,
    dialect: str = "openai",
) -> Response[Any]:
    """Route one request to its model's backend (``path`` there) and relay the answer.

    ``endpoint`` is the capability asked for (default ``path``); a model whose backend does not
    serve it is a 404 before anything loads. ``dialect`` is the shape of errors.
    """
    state = request.app.state
    _check_content_type(request)
    body = await request.body()
    routing = route_body(body)
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if dialect == "anthropic":
        headers = tuple(
            (name.encode(), value.encode("latin-1"))
            for name in _ANTHROPIC_HEADERS
            if (value := request.headers.get(name)) is not None
        )
    peer = route_to_peer(request, routing.model)
    if peer is not None:  # another swapper's model: it loads it, queues and shapes it
        stream = routing.stream is True
        onward = PeerForward(path, body, routing.model, stream, dialect, headers=headers)
        return await forward_to_peer(request, peer, onward)
    model_id = state.coordinator.resolve(routing.model)
    note_model(request.scope, model_id)
    state.catalog.check_serves(model_id, endpoint or path)
    forward = Forward(
        path, body, model_id, routing.model, routing.stream is True, dialect, headers=headers
    )
    feedback = state.config.swapper.loading_feedback
    # Anthropic streams wait for the load silently: a failed load is then an HTTP error the
    # SDK raises as its own class, not an event mid-stream.
    if (
        forward.stream
        and feedback != "none"
        and dialect == "openai"
        and not state.coordinator.admits_now(model_id)
    ):
        # Check and queue now, so that a model that cannot start, a full queue or a
        # backing-off model is still a 503/429; only then commit to a 200 whose stream
        # carries the loading progress.
        await state.coordinator.preflight(model_id)
        if state.stopping.is_set():
            state.coordinator.begin_shutdown()  # the enqueue below answers 503
        ticket = state.coordinator.enqueue(model_id)
        mode = feedback if path == "/v1/chat/completions" else "comments"
        return loading_stream(state, request.scope, forward, mode, ticket)
    return await forward_now(request, forward)


async def forward_now(
    request: Request[Any, Any, State], forward: Forward, *, watch_disconnect: bool = True
) -> Response[Any]:
    """Open the exchange and answer.

    A client that goes away while its model loads or its answer is generated cancels the
    upstream work: the exchange races the ASGI disconnect message. ``watch_disconnect=False``
    while an upload is still being relayed: the body stream itself notices a disconnect then.
    """
    exchange = Exchange(request.app.state, request.scope, forward)
    opening = exchange.start()
    # (The exchange's close cancels the opening.)
    if await client_left_first(request, opening, watch=watch_disconnect, stop=exchange.close):
        logger.info("client went away; request for %s cancelled", forward.model_id)
        return Response(b"", status_code=499)
    if opening.exception() is not None:
        await exchange.close()
        opening.result()  # raises it
    return exchange.response()


# -- OpenAI endpoints ---------------------------------------------------------------------------


@post("/v1/chat/completions", guards=[require_key], operation_class=ChatOperation, status_code=200)
async def chat_completions(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI chat completions, routed by the body's ``model``; streams pass through as SSE."""
    return await forward_request(request, "/v1/chat/completions")


@post("/v1/completions", guards=[require_key], operation_class=CompletionOperation, status_code=200)
async def completions(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI legacy completions, routed by the body's ``model``."""
    return await forward_request(request, "/v1/completions")


@post("/v1/embeddings", guards=[require_key], operation_class=EmbeddingOperation, status_code=200)
async def embeddings(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI embeddings, routed by the body's ``model``."""
    return await forward_request(request, "/v1/embeddings")


@get("/v1/models", guards=[require_key])
async def list_models(request: Request[Any, Any, State]) -> Response[bytes]:
    """Every listed model, loaded or not, with its status, then the peers' models (``owned_by``
    the peer); never triggers a load."""
    state = request.app.state
    document = state.catalog.list_document(state.coordinator.loads(), peer_models(request))
    return Response(document, media_type=JSON)


@get("/v1/models/{name:str}", guards=[require_key])
async def retrieve_model(request: Request[Any, Any, State], name: FromPath[str]) -> Response[bytes]:
    """One model by id or alias (unlisted ones too; a peer's), with its status; never triggers
    a load."""
    state = request.app.state
    if name not in state.catalog.names:
        return Response(_ENCODE.encode(peer_model(request, name)), media_type=JSON)
    document = state.catalog.model_document(name, state.coordinator.loads())
    return Response(document, media_type=JSON)


OPENAI_HANDLERS = [chat_completions, completions, embeddings, list_models, retrieve_model]
