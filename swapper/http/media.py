"""The media endpoints: audio transcription, translation and speech; image generation and edits.

Uploads (``multipart/form-data``: transcriptions, translations, image edits) are routed by their
``model`` form field and relayed to the backend as they arrive (:mod:`swapper.http.upload`), so
a large audio file is never held whole. Speech answers with binary audio, relayed as it is
generated. All of them go through the same lease and :class:`~swapper.http.exchange.Exchange`
as the chat endpoints: the model is loaded first, queued behind its limits, renamed for the
backend where it knows the model by another name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.datastructures import State
from litestar.exceptions import InternalServerException

from swapper.errors import InvalidRequest, UnsupportedMediaType
from swapper.http.access import require_key
from swapper.http.exchange import Forward
from swapper.http.forwarding import forward_now
from swapper.http.logs import note_model
from swapper.http.peers import PeerForward, forward_to_peer, route_to_peer
from swapper.http.upload import outgoing_body, read_upload

__all__ = ["MEDIA_HANDLERS"]

logger = logging.getLogger("swapper")


class _Model(msgspec.Struct):
    model: str


_MODEL = msgspec.json.Decoder(_Model)


def _json_model(request: Request[Any, Any, State], body: bytes) -> str:
    """The ``model`` of a JSON body, or InvalidRequest / UnsupportedMediaType."""
    content_type = request.headers.get("content-type")
    media = (content_type or "application/json").partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {media!r}", code="unsupported_media_type"
        )
    try:
        model = _MODEL.decode(body).model
    except msgspec.ValidationError as exc:
        if "missing required field `model`" in str(exc):
            raise InvalidRequest("You must provide a model parameter", param="model") from None
        if "at `$.model`" in str(exc):
            raise InvalidRequest("`model` must be a string", param="model") from None
        raise InvalidRequest("The request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not model:
        raise InvalidRequest("`model` must not be empty", param="model")
    return model


class _ClientLeft(Exception):
    """The client disconnected before its upload was complete."""


async def _received(request: Request[Any, Any, State]) -> AsyncIterator[bytes]:
    """The request body as it arrives."""
    try:
        async for chunk in request.stream():
            yield chunk
    except InternalServerException:  # Litestar's word for an http.disconnect mid-body
        raise _ClientLeft from None


async def _forward_json(
    request: Request[Any, Any, State], path: str, *, binary: bool = False
) -> Response[Any]:
    state = request.app.state
    body = await request.body()
    requested = _json_model(request, body)
    peer = route_to_peer(request, requested)
    if peer is not None:
        return await forward_to_peer(request, peer, PeerForward(path, body, requested))
    model_id = state.coordinator.resolve(requested)
    note_model(request.scope, model_id)
    state.catalog.check_serves(model_id, path)  # a 404 before anything loads
    forward = Forward(path, body, model_id, requested, False, binary=binary)
    return await forward_now(request, forward)


async def _forward_upload(request: Request[Any, Any, State], path: str) -> Response[Any]:
    state = request.app.state
    declared = request.headers.get("content-length")
    try:
        length = int(declared) if declared is not None else None
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    try:
        upload = await read_upload(
            _received(request), request.headers.get("content-type", ""), length
        )
        peer = route_to_peer(request, upload.model)
        if peer is not None:
            body, content_type, length = outgoing_body(upload, None, upload.model)
            onward = PeerForward(
                path,
                body,
                upload.model,
                content_type=content_type,
                content_length=length,
                watch_disconnect=False,
            )
            return await forward_to_peer(request, peer, onward)
        model_id = state.coordinator.resolve(upload.model)
        note_model(request.scope, model_id)
        state.catalog.check_serves(model_id, path)  # a 404 before anything loads
        forward = Forward(path, upload, model_id, upload.model, False)
        return await forward_now(request, forward, watch_disconnect=False)
    except _ClientLeft:
        # The exchange was closed on the way out (lease given back, backend connection cut).
        logger.info("client went away during an upload to %s", path)
        return Response(b"", status_code=499)


@post("/v1/audio/transcriptions", guards=[require_key], status_code=200)
async def transcriptions(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI audio transcription (multipart), routed by the ``model`` field; relayed as it
    arrives."""
    return await _forward_upload(request, "/v1/audio/transcriptions")


@post("/v1/audio/translations", guards=[require_key], status_code=200)
async def translations(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI audio translation (multipart), routed by the ``model`` field."""
    return await _forward_upload(request, "/v1/audio/translations")


@post("/v1/audio/speech", guards=[require_key], status_code=200)
async def speech(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI text to speech, routed by the body's ``model``; the audio streams back."""
    return await _forward_json(request, "/v1/audio/speech", binary=True)


@post("/v1/images/generations", guards=[require_key], status_code=200)
async def image_generations(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI image generation, routed by the body's ``model``."""
    return await _forward_json(request, "/v1/images/generations")


@post("/v1/images/edits", guards=[require_key], status_code=200)
async def image_edits(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI image edits (multipart), routed by the ``model`` field."""
    return await _forward_upload(request, "/v1/images/edits")


MEDIA_HANDLERS = [transcriptions, translations, speech, image_generations, image_edits]
