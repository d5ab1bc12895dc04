"""The HTTP application: Litestar wiring, the lifespan that owns the coordinator, and errors.

Every error, swapper's or the framework's, becomes OpenAI error JSON in one place,
:func:`_render_error`. The endpoints live in :mod:`swapper.http.forwarding` (OpenAI),
:mod:`swapper.http.endpoints` (the other routed ones) and :mod:`swapper.http.admin` (operators).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_500_INTERNAL_SERVER_ERROR

from swapper import __version__
from swapper.backends import leftovers
from swapper.backends.registry import BackendRegistry
from swapper.config import Config, load_config
from swapper.errors import SwapperError
from swapper.gpu import GpuMonitor
from swapper.http.access import HostOriginGuard, require_key
from swapper.http.activity import Activity
from swapper.http.admin import ADMIN_HANDLERS
from swapper.http.anthropic import ANTHROPIC_PATHS, anthropic_error_body
from swapper.http.catalog import Catalog
from swapper.http.dashboard import UI_HANDLERS
from swapper.http.endpoints import ENDPOINT_HANDLERS
from swapper.http.forwarding import OPENAI_HANDLERS
from swapper.http.logs import request_id_middleware
from swapper.http.media import MEDIA_HANDLERS
from swapper.http.metrics import Metrics
from swapper.http.ollama.routes import OLLAMA_ROUTER
from swapper.http.openapi import list_model_names
from swapper.http.responses import INTERNAL_ERROR, JSON, json_response
from swapper.peers import PeerDirectory
from swapper.scheduling.coordinator import SwapCoordinator
from swapper.scheduling.placement import default_state_file
from swapper.upstream.client import UpstreamClient

__all__ = ["begin_shutdown", "create_app"]

logger = logging.getLogger("swapper")

_ENCODE = msgspec.json.Encoder()


# -- errors ----------------------------------------------------------------------------------------


def _render_error(request: Request[Any, Any, State], exc: Exception) -> Response[bytes]:
    """Every error, ours or the framework's, as OpenAI error JSON (Anthropic's on its own
    endpoints); never a traceback."""
    response = _render_openai_error(request, exc)
    if request.url.path in ANTHROPIC_PATHS:
        status = response.status_code or HTTP_500_INTERNAL_SERVER_ERROR
        body = anthropic_error_body(status, response.content)
        return Response(body, status_code=status, media_type=JSON, headers=response.headers)
    return response


def _render_openai_error(request: Request[Any, Any, State], exc: Exception) -> Response[bytes]:
    if isinstance(exc, SwapperError):
        return json_response(exc.to_openai(), exc.status_code, exc.headers())
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = {
            "message": exc.detail,
            "type": "invalid_request_error" if exc.status_code < 500 else "server_error",
            "param": None,
            "code": code,
        }
        return json_response({"error": error}, exc.status_code, dict(exc.headers or {}))
    if isinstance(exc, RecursionError) and "while deserializing" in str(exc):
        # msgspec's answer to JSON nested deeper than the interpreter's recursion limit allows
        # (about a thousand levels): the client's mistake, not ours.
        error = {
            "message": "The request body is nested too deeply",
            "type": "invalid_request_error",
            "param": None,
            "code": "nested_too_deeply",
        }
        return json_response({"error": error}, HTTP_400_BAD_REQUEST)
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response(INTERNAL_ERROR, HTTP_500_INTERNAL_SERVER_ERROR)


# -- application -----------------------------------------------------------------------------------


def create_app(config: Config, registry: BackendRegistry) -> Litestar:
    """Build the Litestar app; the lifespan owns the coordinator and the upstream client."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Before any backend starts: a swapper killed outright may have left some on the GPU.
        state = config.swapper.state_file
        await asyncio.to_thread(
            leftovers.reclaim, (Path(state) if state else default_state_file()).parent
        )
        gpu = GpuMonitor()
        coordinator = SwapCoordinator(config, registry, gpu)
        upstream = UpstreamClient(
            connect_timeout=config.timeouts.connect, read_timeout=config.timeouts.read
        )
        app.state.config = config
        app.state.coordinator = coordinator
        app.state.upstream = upstream
        app.state.catalog = Catalog(config, registry)
        app.state.reload = lambda: _reload(app, registry)
        app.state.gpu = gpu
        app.state.stopping = asyncio.Event()  # set when shutdown begins: streams end then
        app.state.loop = asyncio.get_running_loop()
        app.state.metrics = Metrics(coordinator, app.state.gpu)
        peers = PeerDirectory(config.peers, read_timeout=config.timeouts.read)
        app.state.peers = peers
        peers.start()
        app.state.activity = activity = Activity(config.activity, coordinator, gpu)
        activity.start()
        logger.info("Swapper Service initialized with %d models", len(config.models))
        loop = asyncio.get_running_loop()
        # No SIGHUP where signals cannot be had: Windows, or a server run outside the main thread.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(_reload_logged(app))
            )
        warmup = None
        if config.swapper.default_model:
            warmup = asyncio.create_task(_warm(coordinator, config.swapper.default_model))
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            if warmup is not None:
                warmup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warmup
            await peers.aclose()
            await activity.stop()
            await coordinator.close()
            await upstream.aclose()
            logger.info("Swapper Service stopped; every backend is down")

    cors = config.server.cors_origins
    app = Litestar(
        route_handlers=[
            *OPENAI_HANDLERS,
            *ENDPOINT_HANDLERS,
            *MEDIA_HANDLERS,
            *ADMIN_HANDLERS,
            *UI_HANDLERS,
            OLLAMA_ROUTER,
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: _render_error},
        request_max_body_size=config.server.max_request_bytes,
        cors_config=CORSConfig(allow_origins=cors, allow_headers=["*"]) if cors else None,
        logging_config=None,  # swapper configures logging itself (cli)
        openapi_config=_openapi_config(),
    )
    # Before CORS, routing and everything else: see HostOriginGuard.
    app.asgi_handler = HostOriginGuard(app.asgi_handler, config.server)
    # Outermost, around the router and the guard too: unknown paths and refused requests also
    # get a request id, an access-log line and a count.
    app.asgi_handler = request_id_middleware(app.asgi_handler)
    # The schema is built at startup: it names the models configured then.
    list_model_names(app, list(config.names))
    return app


def _openapi_config() -> OpenAPIConfig:
    """The schema as JSON (also at ``/schema``) and YAML, behind the keys; no HTML viewers, as
    those load their scripts and fonts from CDNs."""
    return OpenAPIConfig(
        title="swapper",
        version=__version__,
        render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"]), YamlRenderPlugin()],
        openapi_router=Router(
            path="/schema",
            guards=[require_key],
            route_handlers=[],
            after_request=_schema_not_found_as_json,
        ),
    )


async def _schema_not_found_as_json(response: Response[Any]) -> Response[Any]:
    """Litestar answers unknown ``/schema/...`` paths with an HTML page; swapper speaks JSON."""
    if response.status_code != 404:
        return response
    error = {
        "message": "Not found: the schema is at /schema/openapi.json and /schema/openapi.yaml",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    return json_response({"error": error}, 404)


def begin_shutdown(app: Litestar) -> None:
    """Tell long-lived streams (``/events``, followed logs) to end; safe from a signal handler."""
    loop = app.state.get("loop")
    stopping = app.state.get("stopping")
    if loop is not None and stopping is not None and not loop.is_closed():
        loop.call_soon_threadsafe(stopping.set)


async def _reload(app: Litestar, registry: BackendRegistry) -> dict[str, Any]:
    """Apply the config file again; an invalid file raises ConfigError and changes nothing."""
    old: Config = app.state.config
    new = load_config(old.path, registry.schemas())
    # What is fixed at startup (listening socket, CORS, body limit, timeouts of the pool) needs
    # a restart; say so rather than pretend.
    fixed = [
        name
        for name in (
            "server.host",
            "server.port",
            "server.cors_origins",
            "server.allowed_hosts",
            "server.max_request_bytes",
            "timeouts",
            "peers",
        )
        if _pick(old, name) != _pick(new, name)
    ]
    if fixed:
        logger.warning("config reload: %s changed; restart swapper to apply", ", ".join(fixed))
    summary = app.state.coordinator.reload(new)
    app.state.config = new
    app.state.catalog = Catalog(new, registry)
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
