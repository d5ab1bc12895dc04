"""The HTTP layer: OpenAI-compatible endpoints and the admin API, on Litestar.

Handlers stay thin: they find the model named in the body, ask the coordinator for a lease and
relay the backend's answer byte for byte. Every error becomes OpenAI error JSON in one place,
:func:`_render_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers.base import BaseRouteHandler
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response import Stream
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ASGIApp, Receive, Scope, Send

from swapper.config import Config, load_config
from swapper.coordinator import Lease, SwapCoordinator
from swapper.errors import (
    BackendTimeout,
    Forbidden,
    InvalidRequest,
    SwapperError,
    Unauthorized,
    UnsupportedMediaType,
)
from swapper.openapi import (
    ChatOperation,
    CompletionOperation,
    EmbeddingOperation,
    list_model_names,
)
from swapper.plugins import BackendRegistry
from swapper.upstream import UpstreamClient, UpstreamResponse, error_event, normalise_error

__all__ = ["create_app"]

logger = logging.getLogger("swapper")

_ENCODE = msgspec.json.Encoder()
_JSON = "application/json"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- access ----------------------------------------------------------------------------------------


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes | None:
    auth = connection.headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode()
    key = connection.headers.get("x-api-key")
    return key.encode() if key else None


def _matches(candidate: bytes, keys: list[str]) -> bool:
    # Compare with every key, each in constant time, so timing reveals neither key nor position.
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key.encode())
    return found


def require_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: any configured API key (or an admin key) when keys are configured."""
    server = connection.app.state.config.server
    if not server.api_keys and not server.admin_api_keys:
        return
    key = _presented_key(connection)
    if key is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
    if not (_matches(key, server.api_keys) | _matches(key, server.admin_api_keys)):
        raise Unauthorized("Invalid API key")


def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: an admin key for load, unload and reload whenever any keys are configured."""
    server = connection.app.state.config.server
    if not server.api_keys and not server.admin_api_keys:
        return
    key = _presented_key(connection)
    if key is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
    if _matches(key, server.admin_api_keys):
        return
    if _matches(key, server.api_keys):
        raise Forbidden("This endpoint needs a key from server.admin_api_keys")
    raise Unauthorized("Invalid API key")


class _Routing(msgspec.Struct):
    """The only part of a request body swapper reads; everything else passes through untouched."""

    model: str
    stream: Any = None


_ROUTING = msgspec.json.Decoder(_Routing)


def _route(body: bytes) -> _Routing:
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


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(_ENCODE.encode(data), status_code=status, media_type=_JSON, headers=headers)


# -- forwarding -------------------------------------------------------------------------------


async def _relay(lease: Lease, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    """Stream the backend's bytes as they arrive; a broken backend ends with an error event."""
    try:
        async for chunk in upstream.iter_bytes():
            yield chunk
    except SwapperError as exc:
        logger.warning("stream from %s ended early: %s", lease.model_id, exc.message)
        if isinstance(exc, BackendTimeout):
            lease.backend_silent()
        yield error_event(exc.message, code=exc.code or "backend_error")
    finally:
        lease.release()
        await upstream.aclose()


class _RelayStream(Stream):
    """An SSE relay whose lease is released however the response ends.

    Litestar may cancel a stream before its iterator first runs (the client left at once); the
    generator's own ``finally`` would then never run, so the ASGI call is guarded as well.
    """

    def __init__(self, lease: Lease, upstream: UpstreamResponse) -> None:
        super().__init__(_relay(lease, upstream), status_code=upstream.status,
                         media_type=upstream.content_type, headers=_SSE_HEADERS)
        self.lease = lease
        self.upstream = upstream

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:
        inner = super().to_asgi_response(*args, **kwargs)
        lease, upstream = self.lease, self.upstream

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await inner(scope, receive, send)
            finally:
                lease.release()
                await upstream.aclose()

        return guarded


async def _exchange(request: Request[Any, Any, State], path: str, body: bytes,
                    model_id: str, stream: bool) -> tuple[Lease, UpstreamResponse, bytes | None]:
    """Get a lease and the backend's answer: headers only for a stream, the body otherwise."""
    state = request.app.state
    lease = await state.coordinator.acquire(model_id)
    try:
        upstream = await state.upstream.send(model_id, lease.base_url, path, body,
                                             keep_alive=not stream,
                                             max_connections=lease.max_connections)
        if upstream.is_stream and upstream.status == 200:
            return lease, upstream, None  # the relay releases the lease when the stream ends
        content = await upstream.read()
    except BackendTimeout:
        lease.backend_silent()
        lease.release()
        raise
    except BaseException:
        lease.release()
        raise
    lease.release()
    return lease, upstream, content


async def _until_disconnect(request: Request[Any, Any, State]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_content_type(request: Request[Any, Any, State]) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # curl -d without -H, and other lax clients: the body is parsed as JSON anyway
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media!r}",
                                   code="unsupported_media_type")


async def _forward(request: Request[Any, Any, State], path: str) -> Response[Any]:
    _check_content_type(request)
    body = await request.body()
    routing = _route(body)
    model_id = request.app.state.coordinator.resolve(routing.model)
    # A client that goes away while its model loads or its answer is generated cancels the
    # upstream work: race the exchange against the ASGI disconnect message.
    exchange = asyncio.ensure_future(
        _exchange(request, path, body, model_id, stream=routing.stream is True))
    disconnect = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((exchange, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not exchange.done():
            exchange.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await exchange
    if exchange.cancelled():
        logger.info("client went away; request for %s cancelled", model_id)
        return Response(b"", status_code=499)
    lease, upstream, content = exchange.result()
    if content is None:
        return _RelayStream(lease, upstream)
    if upstream.status >= 400:
        content = normalise_error(upstream.status, content)
        return Response(content, status_code=upstream.status, media_type=_JSON)
    return Response(content, status_code=upstream.status, media_type=upstream.content_type or _JSON)


# -- OpenAI endpoints ---------------------------------------------------------------------------


@post("/v1/chat/completions", guards=[require_key], operation_class=ChatOperation,
      status_code=200)
async def chat_completions(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI chat completions, routed by the body's ``model``; streams pass through as SSE."""
    return await _forward(request, "/v1/chat/completions")


@post("/v1/completions", guards=[require_key], operation_class=CompletionOperation,
      status_code=200)
async def completions(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI legacy completions, routed by the body's ``model``."""
    return await _forward(request, "/v1/completions")


@post("/v1/embeddings", guards=[require_key], operation_class=EmbeddingOperation,
      status_code=200)
async def embeddings(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI embeddings, routed by the body's ``model``."""
    return await _forward(request, "/v1/embeddings")


@get("/v1/models", guards=[require_key])
async def list_models(state: State) -> Response[bytes]:
    """Every configured model, loaded or not; never triggers a load."""
    return Response(state.models_document, media_type=_JSON)


# -- admin endpoints ------------------------------------------------------------------------------


@get("/health")
async def health() -> Response[bytes]:
    """200 while the service is up."""
    return _json({"status": "ok"})


@get("/status", guards=[require_key])
async def status(state: State) -> Response[bytes]:
    """Every model's status, backend, pid, port, load time and last error."""
    return _json(state.coordinator.status())


@post("/models/{model:str}/load", guards=[require_admin], status_code=200)
async def load_model(state: State, model: FromPath[str]) -> Response[bytes]:
    """Make a model resident (swapping out the active one) and wait until it is."""
    coordinator: SwapCoordinator = state.coordinator
    model_id = coordinator.resolve(model)
    await coordinator.load(model_id)
    return _json({"model": model_id, **coordinator.status()["models"][model_id]})


@post("/models/{model:str}/unload", guards=[require_admin], status_code=200)
async def unload_model(state: State, model: FromPath[str]) -> Response[bytes]:
    """Unload a model once its in-flight requests finish."""
    coordinator: SwapCoordinator = state.coordinator
    model_id = coordinator.resolve(model)
    await coordinator.unload(model_id)
    return _json({"model": model_id, **coordinator.status()["models"][model_id]})


@post("/admin/reload", guards=[require_admin], status_code=200)
async def reload_config(state: State) -> Response[bytes]:
    """Re-read the config file; unchanged models keep running. A bad file changes nothing."""
    return _json(await state.reload())


# -- errors ----------------------------------------------------------------------------------------


def _render_error(request: Request[Any, Any, State], exc: Exception) -> Response[bytes]:
    """Every error, ours or the framework's, as OpenAI error JSON; never a traceback."""
    if isinstance(exc, SwapperError):
        return _json(exc.to_openai(), exc.status_code, exc.headers())
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = {"message": exc.detail, "type": "invalid_request_error" if exc.status_code < 500
                 else "server_error", "param": None, "code": code}
        return _json({"error": error}, exc.status_code, dict(exc.headers or {}))
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    error = {"message": "Internal server error", "type": "server_error", "param": None,
             "code": "internal_error"}
    return _json({"error": error}, HTTP_500_INTERNAL_SERVER_ERROR)


# -- application -----------------------------------------------------------------------------------


def _models_document(config: Config) -> bytes:
    created = int(time.time())
    data = [{"id": model_id, "object": "model", "created": created, "owned_by": "swapper"}
            for model_id in config.models]
    return _ENCODE.encode({"object": "list", "data": data})


def create_app(config: Config, registry: BackendRegistry) -> Litestar:
    """Build the Litestar app; the lifespan owns the coordinator and the upstream client."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        coordinator = SwapCoordinator(config, registry)
        upstream = UpstreamClient(connect_timeout=config.timeouts.connect,
                                  read_timeout=config.timeouts.read)
        app.state.config = config
        app.state.coordinator = coordinator
        app.state.upstream = upstream
        app.state.models_document = _models_document(config)
        app.state.reload = lambda: _reload(app, registry)
        logger.info("Swapper Service initialized with %d models", len(config.models))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload_logged(app)))
        warmup = None
        if config.swapper.default_model:
            warmup = asyncio.create_task(_warm(coordinator, config.swapper.default_model))
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            if warmup is not None:
                warmup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warmup
            await coordinator.close()
            await upstream.aclose()
            logger.info("Swapper Service stopped; every backend is down")

    cors = config.server.cors_origins
    app = Litestar(
        route_handlers=[chat_completions, completions, embeddings, list_models, health, status,
                        load_model, unload_model, reload_config],
        lifespan=[lifespan],
        exception_handlers={Exception: _render_error},
        request_max_body_size=config.server.max_request_bytes,
        cors_config=CORSConfig(allow_origins=cors, allow_headers=["*"]) if cors else None,
        logging_config=None,  # swapper configures logging itself (cli)
    )
    # The schema is built at startup: it names the models configured then.
    list_model_names(app, [name for mid, e in config.models.items() for name in (mid, *e.aliases)])
    return app


async def _reload(app: Litestar, registry: BackendRegistry) -> dict[str, Any]:
    """Apply the config file again; an invalid file raises ConfigError and changes nothing."""
    old: Config = app.state.config
    new = load_config(old.path, registry.schemas())
    # What is fixed at startup (listening socket, CORS, body limit, timeouts of the pool) needs
    # a restart; say so rather than pretend.
    fixed = [name for name in ("server.host", "server.port", "server.cors_origins",
                               "server.max_request_bytes", "timeouts")
             if _pick(old, name) != _pick(new, name)]
    if fixed:
        logger.warning("config reload: %s changed; restart swapper to apply", ", ".join(fixed))
    summary = app.state.coordinator.reload(new)
    app.state.config = new
    app.state.models_document = _models_document(new)
    return {"reloaded": new.path, **summary, "needs_restart": fixed}


def _pick(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


async def _reload_logged(app: Litestar) -> None:
    """SIGHUP: reload, and on a bad file log the one-line error and keep serving."""
    try:
        await app.state.reload()
    except SwapperError as exc:
        logger.error("config reload rejected; still serving the previous config: %s", exc.message)


async def _warm(coordinator: SwapCoordinator, model_id: str) -> None:
    logger.info("Loading default model: %s", model_id)
    try:
        await coordinator.load(model_id)
    except SwapperError as exc:
        logger.error("Default model %s failed to load: %s", model_id, exc.message)
        return
    logger.info("Default model loaded: %s", model_id)
