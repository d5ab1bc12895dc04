"""Ollama's own API, ``/api/*``, in front of every backend.

Chat, generate and embeddings are translated (:mod:`.translate`, :mod:`.answers`) to the
backend's OpenAI endpoints and sent on the same path as ``/v1/chat/completions``: a lease from
the coordinator and an :class:`~swapper.http.exchange.Exchange`. Models of the ``ollama``
backend get the request as it came, untranslated. Every error on ``/api/*`` is Ollama's
``{"error": "..."}`` with its HTTP status, so Ollama clients raise their own ``ResponseError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, post, route
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from swapper.errors import SwapperError
from swapper.http.access import require_key
from swapper.http.admin import read_status
from swapper.http.exchange import Exchange, Forward, unless_stopping
from swapper.http.logs import note_model
from swapper.http.ollama import models
from swapper.http.ollama.answers import NativeLines, StreamTranslator, chat_answer, now_rfc3339
from swapper.http.ollama.exchanges import (
    ClientLeft,
    open_exchange,
    unexpected_answer,
    upstream_error,
)
from swapper.http.ollama.translate import (
    OllamaRequestError,
    chat_request,
    embed_request,
    generate_request,
    keep_alive_seconds,
)
from swapper.http.peers import forward_ollama_to_peer, peer_tags
from swapper.http.responses import JSON, GuardedStream, json_response
from swapper.scheduling.model_state import ModelStatus

__all__ = ["OLLAMA_API_VERSION", "OLLAMA_ROUTER"]

logger = logging.getLogger("swapper")

#: The Ollama release whose API shapes these endpoints follow; ``/api/version`` reports it, as
#: clients compare it to decide which features to use.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"

_DECODE = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()


# -- errors ----------------------------------------------------------------------------------------


def _render_error(request: Request[Any, Any, State], exc: Exception) -> Response[bytes]:
    """Every error on ``/api/*`` as Ollama's ``{"error": "..."}``; never a traceback."""
    if isinstance(exc, ClientLeft):
        return Response(b"", status_code=499)  # no one reads it; the access log does
    if isinstance(exc, SwapperError):
        return json_response({"error": exc.message}, exc.status_code, exc.headers())
    if isinstance(exc, OllamaRequestError):
        return json_response({"error": str(exc)}, 400)
    if isinstance(exc, HTTPException):
        return json_response({"error": exc.detail}, exc.status_code, dict(exc.headers or {}))
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response({"error": "internal server error"}, 500)


# -- helpers ---------------------------------------------------------------------------------------


async def _body(request: Request[Any, Any, State]) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = _DECODE.decode(raw)
    except msgspec.DecodeError as exc:
        raise OllamaRequestError(f"invalid JSON in the request body: {exc}") from None
    if not isinstance(data, dict):
        raise OllamaRequestError("the request body must be a JSON object")
    return data


def _model(request: Request[Any, Any, State], data: dict[str, Any]) -> tuple[str, str]:
    """The name the client gave and the model id it resolves to."""
    name = data.get("model") or data.get("name")  # /api/show took "name" before "model"
    if not isinstance(name, str) or not name:
        raise OllamaRequestError("model is required")
    model_id = models.resolve_name(request.app.state.coordinator, name)
    note_model(request.scope, model_id)
    return name, model_id


def _keep_alive(state: State, model_id: str, seconds: float | None) -> None:
    """Apply a request's ``keep_alive``. As in Ollama, every request sets it: one without
    (None) puts the model back on its configured ttl."""
    state.coordinator.keep_alive(model_id, seconds)


async def _native(
    request: Request[Any, Any, State], path: str, data: dict[str, Any], name: str, model_id: str
) -> Response[Any]:
    """A model of the ``ollama`` backend: the request, untranslated, to Ollama's own endpoint.

    All but ``keep_alive``: swapper decides when its models unload (Ollama's keep_alive 0
    would unload the model behind its back), so that goes to the coordinator instead.
    """
    state = request.app.state
    seconds = keep_alive_seconds(data.pop("keep_alive", None))
    stream = data.get("stream", True) is not False and path != "/api/embed"
    # A stream is relayed as it arrives (``binary``: whatever its type, never rewritten as
    # SSE), its lines renamed here; the request body still names Ollama's tag.
    forward = Forward(path, _ENCODE.encode(data), model_id, name, stream, binary=stream)
    exchange, _ = await open_exchange(request, forward)
    _keep_alive(state, model_id, seconds)
    lines = NativeLines(name)  # as translated answers do: the name the client used
    if exchange.content is None:
        return GuardedStream(_native_lines(exchange, lines), exchange.close, media_type=NDJSON)
    async with exchange:
        upstream = exchange.upstream
        assert upstream is not None and exchange.content is not None
        content = exchange.content
        return Response(
            lines.line(content) if upstream.status < 400 else content,
            status_code=upstream.status,
            media_type=upstream.content_type or JSON,
        )


async def _native_lines(exchange: Exchange, lines: NativeLines) -> AsyncIterator[bytes]:
    try:
        async for chunk in exchange.relay():
            renamed = lines.feed(chunk)
            if renamed:
                yield renamed
        if last := lines.finish():
            yield last
    finally:
        await exchange.close()


async def _ndjson(
    exchange: Exchange, translator: StreamTranslator, started: int, load_ns: int
) -> AsyncIterator[bytes]:
    try:
        async for chunk in exchange.relay():
            lines = translator.feed(chunk)
            if lines:
                yield lines
        yield translator.finish(total_ns=time.perf_counter_ns() - started, load_ns=load_ns)
    finally:
        await exchange.close()


async def _load_only(
    state: State, model_id: str, name: str, seconds: float | None, generate: bool
) -> Response[bytes]:
    """A request without a prompt: Ollama's way to load (or, with keep_alive 0, unload)."""
    if seconds == 0:
        _keep_alive(state, model_id, 0)
        reason = "unload"
    else:
        lease = await unless_stopping(state, state.coordinator.acquire(model_id))
        _keep_alive(state, model_id, seconds)  # before the release: it applies once idle
        lease.release(used=False)
        reason = "load"
    answer: dict[str, Any] = {"model": name, "created_at": now_rfc3339()}
    if generate:
        answer["response"] = ""
    else:
        answer["message"] = {"role": "assistant", "content": ""}
    return json_response({**answer, "done": True, "done_reason": reason})


async def _converse(request: Request[Any, Any, State], generate: bool) -> Response[Any]:
    started = time.perf_counter_ns()
    state = request.app.state
    path = "/api/generate" if generate else "/api/chat"
    if (relayed := await forward_ollama_to_peer(request, path)) is not None:  # a peer's model
        return relayed
    data = await _body(request)
    name, model_id = _model(request, data)
    entry = state.config.models[model_id]
    if not (data.get("prompt") if generate else data.get("messages")):
        # Loading and unloading are swapper's, whatever the backend.
        seconds = keep_alive_seconds(data.get("keep_alive"))
        return await _load_only(state, model_id, name, seconds, generate)
    if entry.backend == "ollama":
        return await _native(
            request, "/api/generate" if generate else "/api/chat", data, name, model_id
        )
    seconds = keep_alive_seconds(data.get("keep_alive"))
    ctx_size = getattr(entry, "ctx_size", None)
    if generate:
        path, body = generate_request(data, model_id, ctx_size)
    else:
        path, body = "/v1/chat/completions", chat_request(data, model_id, ctx_size)
    state.catalog.check_serves(model_id, path)  # a 404 before anything loads
    forward = Forward(path, _ENCODE.encode(body), model_id, model_id, body["stream"])
    exchange, load_ns = await open_exchange(request, forward)
    _keep_alive(state, model_id, seconds)  # with the lease held: it applies once idle
    upstream = exchange.upstream
    assert upstream is not None
    if exchange.content is None:
        translator = StreamTranslator(name, generate=generate)
        stream = _ndjson(exchange, translator, started, load_ns)
        return GuardedStream(stream, exchange.close, media_type=NDJSON)
    await exchange.close()
    if upstream.status >= 400:
        return upstream_error(upstream.status, exchange.content)
    total_ns = time.perf_counter_ns() - started
    with unexpected_answer(model_id):
        answer = chat_answer(
            _DECODE.decode(exchange.content),
            name,
            generate=generate,
            total_ns=total_ns,
            load_ns=load_ns,
        )
    return json_response(answer)


async def _embed(request: Request[Any, Any, State], legacy: bool) -> Response[Any]:
    started = time.perf_counter_ns()
    state = request.app.state
    path = "/api/embeddings" if legacy else "/api/embed"
    if (relayed := await forward_ollama_to_peer(request, path)) is not None:  # a peer's model
        return relayed
    data = await _body(request)
    name, model_id = _model(request, data)
    if state.config.models[model_id].backend == "ollama":
        return await _native(request, path, data, name, model_id)
    seconds = keep_alive_seconds(data.get("keep_alive"))
    body = embed_request(data, model_id, legacy=legacy)
    state.catalog.check_serves(model_id, "/v1/embeddings")  # a 404 before anything loads
    forward = Forward("/v1/embeddings", _ENCODE.encode(body), model_id, model_id, False)
    exchange, load_ns = await open_exchange(request, forward)
    _keep_alive(state, model_id, seconds)
    await exchange.close()
    upstream = exchange.upstream
    assert upstream is not None and exchange.content is not None
    if upstream.status >= 400:
        return upstream_error(upstream.status, exchange.content)
    with unexpected_answer(model_id):
        answer = _DECODE.decode(exchange.content)
        vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda d: d["index"])]
    if legacy:
        return json_response({"embedding": vectors[0]})
    usage = answer.get("usage") or {}
    return json_response(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": load_ns,
            "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
        }
    )


# -- endpoints -------------------------------------------------------------------------------------


@get("/version")
async def version() -> Response[bytes]:
    """The Ollama API version these endpoints follow."""
    return json_response({"version": OLLAMA_API_VERSION})


@get("/tags")
async def tags(request: Request[Any, Any, State], state: State) -> Response[bytes]:
    """Every configured model, loaded or not, with details from its GGUF header; then the
    peers' models."""
    config = state.config
    files = await asyncio.to_thread(models.files_of, config, list(config.models))
    document = models.tags_document(config, files)
    document["models"].extend(peer_tags(request))
    return json_response(document)


@get("/ps")
async def ps(state: State) -> Response[bytes]:
    """The loaded models, their sizes and when their idle ttl unloads them."""
    snapshot = state.coordinator.status()
    loaded = [
        mid
        for mid, model in snapshot.models.items()
        if model.status == ModelStatus.LOADED and mid in state.config.models
    ]
    status, files = await asyncio.gather(
        read_status(state), asyncio.to_thread(models.files_of, state.config, loaded)
    )
    measured = {mid: m["vram_mb"] for mid, m in status["models"].items()}
    return json_response(models.ps_document(state.config, snapshot, files, measured))


@post("/show", status_code=200)
async def show(request: Request[Any, Any, State]) -> Response[bytes]:
    """A model's details, GGUF metadata (``model_info``) and chat template; loads nothing."""
    if (
        relayed := await forward_ollama_to_peer(request, "/api/show")
    ) is not None:  # a peer's model
        return relayed
    data = await _body(request)
    _, model_id = _model(request, data)
    entry = request.app.state.config.models[model_id]
    file = await asyncio.to_thread(models.model_file, entry)
    return json_response(models.show_document(entry, file))


@post("/chat", status_code=200)
async def chat(request: Request[Any, Any, State]) -> Response[Any]:
    """Ollama chat, NDJSON-streamed unless ``stream`` is false."""
    return await _converse(request, generate=False)


@post("/generate", status_code=200)
async def generate(request: Request[Any, Any, State]) -> Response[Any]:
    """Ollama generate; without a prompt it loads the model (keep_alive 0: unloads it)."""
    return await _converse(request, generate=True)


@post("/embed", status_code=200)
async def embed(request: Request[Any, Any, State]) -> Response[Any]:
    """Embeddings of ``input`` (a string or a list)."""
    return await _embed(request, legacy=False)


@post("/embeddings", status_code=200)
async def embeddings(request: Request[Any, Any, State]) -> Response[Any]:
    """The older embeddings endpoint: one ``prompt``, one ``embedding``."""
    return await _embed(request, legacy=True)


def _not_managed(action: str) -> Response[bytes]:
    message = f"{action} is not supported: swapper serves the models in its config and does not manage model files"
    return json_response({"error": message}, 501)


# Not in the OpenAPI schema: they are the operations swapper does not offer.
@post(["/pull", "/push", "/create", "/copy"], status_code=501, include_in_schema=False)
async def manage(request: Request[Any, Any, State]) -> Response[bytes]:
    """Pull, push, create and copy: swapper does not manage model files (501)."""
    return _not_managed(request.url.path.rsplit("/", 1)[-1])


@delete("/delete", status_code=501, include_in_schema=False)
async def delete_model() -> Response[bytes]:
    """Delete: swapper does not manage model files (501)."""
    return _not_managed("delete")


@route(
    "/{rest:path}",
    http_method=["GET", "POST", "PUT", "DELETE", "PATCH"],
    include_in_schema=False,
)
async def unknown(rest: FromPath[str]) -> Response[bytes]:
    """Any other ``/api/*`` path: 404 in Ollama's shape."""
    return json_response(
        {"error": f"/api/{rest.lstrip('/')} is not an endpoint swapper serves"}, 404
    )


#: Every ``/api/*`` endpoint, behind the same keys as ``/v1``, errors in Ollama's shape.
OLLAMA_ROUTER = Router(
    path="/api",
    guards=[require_key],
    route_handlers=[
        version,
        tags,
        ps,
        show,
        chat,
        generate,
        embed,
        embeddings,
        manage,
        delete_model,
        unknown,
    ],
    exception_handlers={Exception: _render_error},
)
