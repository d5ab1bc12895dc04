"""The operators' endpoints: health, status, load/unload/reload, live events, logs, metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from litestar import Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from swapper.errors import InvalidRequest
from swapper.gpu import GpuMonitor, GpuStats
from swapper.http.access import require_admin, require_key, require_metrics_key
from swapper.http.exchange import unless_stopping
from swapper.http.metrics import CONTENT_TYPE
from swapper.http.responses import SSE, SSE_HEADERS, json_response, sse_comment, sse_event
from swapper.scheduling.coordinator import SwapCoordinator
from swapper.scheduling.events import STOPPED, Event, next_event
from swapper.scheduling.snapshot import GpuBudgetSnapshot, Snapshot

__all__ = ["ADMIN_HANDLERS", "peers_section", "read_status", "status_document"]

#: Seconds of silence after which an SSE stream sends a comment, so proxies keep it open.
_PING = 15.0
_PING_COMMENT = sse_comment("ping")


def status_document(
    snapshot: Snapshot, gpus: list[GpuStats], measured_mb: Mapping[str, float | None]
) -> dict[str, Any]:
    """The ``/status`` JSON: a coordinator snapshot, NVML's per-process VRAM, and the GPUs.

    Times are ISO 8601 UTC with milliseconds, the coordinator's MiB rounded to 0.1, the GPUs'
    to whole MiB. ``vram.gpus`` is placement's view of each GPU (empty without GPUs) and each
    model's ``gpus`` the GPUs it is placed on. ``tests/test_status_document.py`` pins this
    shape: clients parse it.
    """
    models = {}
    for model_id, model in snapshot.models.items():
        measured = measured_mb.get(model_id)
        retry_at = (
            None
            if model.retry_at is None
            else snapshot.wall_time + model.retry_at - snapshot.monotonic_time
        )
        models[model_id] = {
            "status": model.status.value,
            "backend": model.backend,
            "pid": model.pid,
            "port": model.port,
            "loaded_at": _iso(model.loaded_at),
            "last_error": model.last_error,
            "in_flight": model.in_flight,
            "queued": model.queued,
            "last_used": _iso(model.last_used),
            "failures": model.failures,
            "retry_at": _iso(retry_at),
            # NVML's live figure; else what the backend reported when it loaded (Ollama's /api/ps).
            "vram_mb": _round(measured if measured is not None else model.vram_mb),
            "predicted_vram_mb": round(model.predicted_vram_mb, 1),
            "pinned": model.pinned,
            "gpus": None if model.gpus is None else list(model.gpus),
        }
    vram = snapshot.vram
    nvml = {g.index: g for g in gpus}
    return {
        "mode": snapshot.mode,
        "active_model": snapshot.active_model,
        "resident": list(snapshot.resident),
        "max_concurrent_models": snapshot.max_concurrent_models,
        "vram": {
            "budget_mb": _round(vram.budget_mb),
            "committed_mb": round(vram.committed_mb, 1),
            "learned_mb": dict(vram.learned_mb),
            "gpus": [_gpu_budget(g, nvml.get(g.index)) for g in vram.gpus],
        },
        "models": models,
        "gpu": {
            "available": bool(gpus),
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "total_mb": round(g.total_mb),
                    "used_mb": round(g.used_mb),
                    "free_mb": round(g.free_mb),
                }
                for g in gpus
            ],
        },
    }


def _gpu_budget(budget: GpuBudgetSnapshot, reading: GpuStats | None) -> dict[str, Any]:
    """One GPU of ``vram.gpus``: placement's budget and commitments, and NVML's memory."""
    # This request's NVML reading, where it has the GPU, agrees with the ``gpu`` section.
    total = reading.total_mb if reading is not None else budget.total_mb
    used = reading.used_mb if reading is not None else budget.used_mb
    free = None if budget.budget_mb is None else budget.budget_mb - budget.committed_mb
    return {
        "index": budget.index,
        "name": budget.name if budget.name is not None or reading is None else reading.name,
        "budget_mb": _round(budget.budget_mb),
        "committed_mb": round(budget.committed_mb, 1),
        # Negative when what is placed outgrew the budget (a measured size above its guess).
        "budget_free_mb": _round(free),
        "models": list(budget.models),
        "total_mb": None if total is None else round(total),
        "used_mb": None if used is None else round(used),
    }


def _read_gpu(
    gpu: GpuMonitor, pids: Mapping[str, int]
) -> tuple[list[GpuStats], dict[str, float | None]]:
    """Every NVML read ``/status`` needs; blocking, so it runs in a worker thread."""
    return gpu.gpus(), {model_id: gpu.process_memory_mb(pid) for model_id, pid in pids.items()}


async def read_status(state: State) -> dict[str, Any]:
    """``/status`` now: the snapshot taken on the loop, NVML read in a worker thread."""
    # A slow or hung driver then stalls only this request, never the event loop.
    snapshot: Snapshot = state.coordinator.status()
    pids = {mid: m.pid for mid, m in snapshot.models.items() if m.pid is not None}
    gpus, measured = await asyncio.to_thread(_read_gpu, state.gpu, pids)
    return {**status_document(snapshot, gpus, measured), **peers_section(state)}


def peers_section(state: State) -> dict[str, Any]:
    """``/status``'s ``peers``: each peer up or down, its last error and models (never its key);
    absent without peers."""
    peers = state.get("peers")
    return {"peers": peers.status()} if peers is not None and peers.peers else {}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


@get("/health")
async def health() -> Response[bytes]:
    """200 while the service is up."""
    return json_response({"status": "ok"})


@get("/status", guards=[require_key])
async def status(state: State) -> Response[bytes]:
    """Every model's status, backend, pid, port, VRAM, load time and last error; the GPUs."""
    return json_response(await read_status(state))


async def _model_action(state: State, model: str, unload: bool) -> Response[bytes]:
    coordinator: SwapCoordinator = state.coordinator
    model_id = coordinator.resolve(model)
    await unless_stopping(
        state, coordinator.unload(model_id) if unload else coordinator.load(model_id)
    )
    # A reload may have removed the model meanwhile: it is then out, or on its way out.
    entry = (await read_status(state))["models"].get(
        model_id, {"status": "UNLOADED", "removed": True}
    )
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


async def _until_shutdown(
    state: State, queue: asyncio.Queue[Any], render: Callable[[Any], bytes]
) -> AsyncIterator[bytes]:
    """Render items as they come, a ``: ping`` after silence, and end when shutdown begins."""
    while True:
        item = await next_event(queue, _PING, state.stopping)
        if item is STOPPED:
            return
        yield _PING_COMMENT if item is None else render(item)


def _render_event(event: Event, **extra: Any) -> bytes:
    return sse_event({**event.data, "time": event.time, **extra}, event.type)


async def _event_stream(state: State) -> AsyncIterator[bytes]:
    with state.coordinator.events.subscribe() as queue:
        # Taken as the queue starts: each event is either in the history or in the queue.
        history = state.activity.history()
        yield sse_event(await read_status(state), "snapshot")
        for event in history:
            yield _render_event(event, history=True)
        async for chunk in _until_shutdown(state, queue, _render_event):
            yield chunk


@get("/events", guards=[require_key])
async def events(state: State) -> Stream:
    """Live status changes, swaps (from, to, reason, seconds), loads, unloads and queue changes.

    Server-sent events: a ``snapshot`` (the ``/status`` document) first, then the recent
    history (the last status changes, swaps, loads and unloads, oldest first, each with
    ``"history": true``), then one event per change, and a ``: ping`` comment after 15 s of
    silence.
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
async def model_logs(
    state: State, model: FromPath[str], lines: FromQuery[int] = 200, follow: FromQuery[bool] = False
) -> Response[Any]:
    """The tail of a model's backend output (kept across restarts); ``?follow=1`` streams it."""
    model_id = state.coordinator.resolve(model)
    if follow:
        return Stream(_log_stream(state, model_id, lines), media_type=SSE, headers=SSE_HEADERS)
    return json_response(
        {"model": model_id, "lines": state.coordinator.model_log(model_id).tail(lines)}
    )


@get("/activity", guards=[require_key])
async def activity(state: State, limit: FromQuery[int | None] = None) -> Response[bytes]:
    """Recent requests, swaps, loads and errors, per-model totals and the per-minute samples.

    Each list is oldest first; ``?limit=N`` keeps the newest N of each.
    """
    if limit is not None and limit < 1:
        raise InvalidRequest("limit: must be >= 1", param="limit")
    return json_response(state.activity.document(limit))


@get("/metrics", guards=[require_metrics_key])
async def metrics(state: State) -> Response[bytes]:
    """Prometheus metrics; open unless ``server.metrics_require_key``."""
    return Response(await state.metrics.render(), media_type=CONTENT_TYPE)


ADMIN_HANDLERS = [
    health,
    status,
    load_model,
    unload_model,
    reload_config,
    events,
    activity,
    model_logs,
    metrics,
]
