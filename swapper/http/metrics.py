"""Prometheus metrics (prometheus-client): swaps, loads, requests, queues, statuses, GPU memory.

Counters and histograms are fed by the coordinator's events and by the HTTP layer; queue depth,
model status and GPU memory are read from the coordinator and NVML when scraped (NVML in a
worker thread: a slow driver must not stall the event loop). Each app has a
registry of its own, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swapper.scheduling.events import Event
from swapper.scheduling.model_state import ModelStatus

if TYPE_CHECKING:
    from swapper.gpu import GpuMonitor, GpuStats
    from swapper.scheduling.coordinator import SwapCoordinator
    from swapper.scheduling.snapshot import VramSnapshot

__all__ = ["CONTENT_TYPE", "Metrics", "gpu_families"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


_MIB = 1024 * 1024


def _gauge(
    name: str, documentation: str, labels: list[str], samples: Iterable[tuple[list[str], float]]
) -> GaugeMetricFamily:
    """A gauge family holding ``samples``, each its label values and its value."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def gpu_families(gpus: list[GpuStats], vram: VramSnapshot) -> Iterator[Metric]:
    """Each GPU's memory (NVML) and budget (placement), and which GPUs each model is on.

    Nothing without GPUs: no series rather than made-up ones.
    """
    if gpus:
        yield _gauge(
            "swapper_gpu_memory_used_bytes",
            "GPU memory in use",
            ["gpu"],
            (([str(g.index)], g.used_mb * _MIB) for g in gpus),
        )
        yield _gauge(
            "swapper_gpu_memory_total_bytes",
            "GPU memory in all",
            ["gpu"],
            (([str(g.index)], g.total_mb * _MIB) for g in gpus),
        )
    if not vram.gpus:
        return
    yield _gauge(
        "swapper_gpu_budget_bytes",
        "What models may use on each GPU together (placement's budget)",
        ["gpu"],
        (([str(g.index)], g.budget_mb * _MIB) for g in vram.gpus if g.budget_mb is not None),
    )
    yield _gauge(
        "swapper_gpu_committed_bytes",
        "What the models placed on each GPU are charged on it",
        ["gpu"],
        (([str(g.index)], g.committed_mb * _MIB) for g in vram.gpus),
    )
    yield _gauge(
        "swapper_model_gpu_info",
        "1 for each GPU a model holds memory on (a split model: each of its GPUs)",
        ["model", "gpu"],
        (([model_id, str(g.index)], 1.0) for g in vram.gpus for model_id in g.models),
    )


class _StateCollector(Collector):
    """Values read at scrape time rather than tracked on every change."""

    def __init__(self, coordinator: SwapCoordinator) -> None:
        self._coordinator = coordinator
        #: NVML's reading for the scrape being rendered, taken off the loop by Metrics.render.
        self.gpus: list[GpuStats] = []

    def collect(self) -> Iterator[Metric]:
        loads = self._coordinator.loads()
        yield _gauge(
            "swapper_queue_depth",
            "Requests waiting for each model",
            ["model"],
            (([model_id], model.queued) for model_id, model in loads.items()),
        )
        yield _gauge(
            "swapper_model_status",
            "1 for each model's current status, 0 for the others",
            ["model", "status"],
            (
                ([model_id, name.value], 1.0 if model.status == name else 0.0)
                for model_id, model in loads.items()
                for name in ModelStatus
            ),
        )
        yield from gpu_families(self.gpus, self._coordinator.status().vram)


class Metrics:
    """The metrics of one swapper app."""

    def __init__(self, coordinator: SwapCoordinator, gpu: GpuMonitor) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.swaps = Counter(
            "swapper_swaps_total",
            "Models made resident, by cause",
            ["from", "to", "reason"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "swapper_load_seconds",
            "Backend start to ready",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.unload_seconds = Histogram(
            "swapper_unload_seconds",
            "Backend stop to gone",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "swapper_requests_total",
            "Requests answered",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.ttfb = Histogram(
            "swapper_time_to_first_byte_seconds",
            "Request received to the backend's first byte (load included)",
            ["model"],
            buckets=_TTFB_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "swapper_backend_restarts_total",
            "Backends started again after dying",
            ["model"],
            registry=r,
        )
        self._gpu = gpu
        self._state = _StateCollector(coordinator)
        r.register(self._state)
        coordinator.events.add_listener(self.on_event)

    def on_event(self, event: Event) -> None:
        """Count what the coordinator reports."""
        data = event.data
        if event.type == "swap":
            self.swaps.labels(data["from"] or "", data["to"], data["reason"]).inc()
            if data["reason"] == "crashed":
                self.restarts.labels(data["to"]).inc()
        elif event.type == "loaded":
            self.load_seconds.labels(data["model"]).observe(data["seconds"])
        elif event.type == "unloaded":
            self.unload_seconds.labels(data["model"]).observe(data["seconds"])

    async def render(self) -> bytes:
        """The Prometheus text exposition; NVML is read in a worker thread."""
        gpus = await asyncio.to_thread(self._gpu.gpus)
        # No await from here to the end: the reading and the coordinator's state are rendered
        # together, on the loop, so a concurrent scrape cannot swap the reading in between.
        self._state.gpus = gpus
        return generate_latest(self.registry)
