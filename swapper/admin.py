"""The operators' endpoints: health, status, load/unload/reload, live events, logs, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from litestar import Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from swapper.access import require_admin, require_key, require_metrics_key
from swapper.coordinator import SwapCoordinator
from swapper.events import STOPPED, next_event
from swapper.exchange import unless_stopping
from swapper.metrics import CONTENT_TYPE
from swapper.responses import SSE, SSE_HEADERS, json_response, sse_comment, sse_event

__all__ = ["ADMIN_HANDLERS", "status_document"]

#: Seconds of silence after which an SSE stream sends a comment, so proxies keep it open.
_PING = 15.0
_PING_COMMENT = sse_comment("ping")


def status_document(state: State) -> dict[str, Any]:
    """``/status``: the coordinator's view, each resident model's measured VRAM, and the GPUs."""
    doc = state.coordinator.status()
    gpu = state.gpu
    pids = state.coordinator.resident_pids()
    for model_id, model in doc["models"].items():
        pid = pids.get(model_id)
        measured = None if pid is None else gpu.process_memory_mb(pid)
        # NVML's live figure; else what the backend reported when it loaded (Ollama's /api/ps).
        model["vram_mb"] = _round(measured if measured is not None else model["vram_mb"])
    doc["gpu"] = gpu.snapshot()
    return doc


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@get("/health")
async def health() -> Response[bytes]:
    """200 while the service is up."""
    return json_response({"status": "ok"})


@get("/status", guards=[require_key])
async def status(state: State) -> Response[bytes]:
    """Every model's status, backend, pid, port, VRAM, load time and last error; the GPUs."""
    return json_response(status_document(state))


async def _model_action(state: State, model: str, unload: bool) -> Response[bytes]:
    coordinator: SwapCoordinator = state.coordinator
    model_id = coordinator.resolve(model)
    await unless_stopping(state, coordinator.unload(model_id) if unload
                          else coordinator.load(model_id))
    # A reload may have removed the model meanwhile: it is then out, or on its way out.
    entry = status_document(state)["models"].get(model_id, {"status": "UNLOADED",
                                                            "removed": True})
    return json_response({"model": model_id, **entry})


@post("/models/{model:str}/load", guards=[require_admin], status_code=200)
async def load_model(state: State, model: FromPath[str]) -> Response[bytes]:
    """Make a model resident (swapping out the active one) and wait until it is."""
    return await _model_action(state, model, unload=False)


@post("/models/{model:str}/unload", guards=[require_admin], status_code=200)
async def unload_model(state: State, model: FromPath[str]) -> Response[bytes]:
    """Unload a model once its in-flight requests finish."""
    return await _model_action(state, model, unload=True)


@post("/admin/reload", guards=[require_admin], status_code=200)
async def reload_config(state: State) -> Response[bytes]:
    """Re-read the config file; unchanged models keep running. A bad file changes nothing."""
    return json_response(await state.reload())


async def _until_shutdown(state: State, queue: asyncio.Queue[Any],
                          render: Callable[[Any], bytes]) -> AsyncIterator[bytes]:
    """Render items as they come, a ``: ping`` after silence, and end when shutdown begins."""
    while True:
        item = await next_event(queue, _PING, state.stopping)
        if item is STOPPED:
            return
        yield _PING_COMMENT if item is None else render(item)


async def _event_stream(state: State) -> AsyncIterator[bytes]:
    with state.coordinator.events.subscribe() as queue:
        yield sse_event(status_document(state), "snapshot")
        async for chunk in _until_shutdown(
                state, queue, lambda event: sse_event({**event.data, "time": event.time}, event.type)):
            yield chunk


@get("/events", guards=[require_key])
async def events(state: State) -> Stream:
    """Live status changes, swaps (from, to, reason, seconds), loads, unloads and queue changes.

    Server-sent events: a ``snapshot`` (the ``/status`` document) first, then one event per
    change, and a ``: ping`` comment after 15 s of silence.
    """
    return Stream(_event_stream(state), media_type=SSE, headers=SSE_HEADERS)


def _log_line(line: str) -> bytes:
    return sse_event({"line": line})


async def _log_stream(state: State, model_id: str, lines: int) -> AsyncIterator[bytes]:
    log = state.coordinator.model_log(model_id)
    with log.follow() as queue:
        for line in log.tail(lines):
            yield _log_line(line)
        async for chunk in _until_shutdown(state, queue, _log_line):
            yield chunk


@get("/models/{model:str}/logs", guards=[require_key])
async def model_logs(state: State, model: FromPath[str], lines: FromQuery[int] = 200,
                     follow: FromQuery[bool] = False) -> Response[Any]:
    """The tail of a model's backend output (kept across restarts); ``?follow=1`` streams it."""
    model_id = state.coordinator.resolve(model)
    if follow:
        return Stream(_log_stream(state, model_id, lines), media_type=SSE,
                      headers=SSE_HEADERS)
    return json_response({"model": model_id,
                          "lines": state.coordinator.model_log(model_id).tail(lines)})


@get("/metrics", guards=[require_metrics_key])
async def metrics(state: State) -> Response[bytes]:
    """Prometheus metrics; open unless ``server.metrics_require_key``."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


ADMIN_HANDLERS = [health, status, load_model, unload_model, reload_config, events, model_logs,
                  metrics]
