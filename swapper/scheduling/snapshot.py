"""Typed snapshots of the coordinator's state, in raw values; the edges format them.

The coordinator fills these on the event loop, in one go, so a snapshot is consistent. Times are
the clocks' own floats (epoch seconds, or ``time.monotonic()`` where stated), sizes unrounded
MiB and statuses enums: turning them into ISO strings and rounded figures is the HTTP layer's
job (:func:`swapper.http.admin.status_document`), not the domain's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from swapper.scheduling.model_state import ModelStatus

if TYPE_CHECKING:
    from swapper.scheduling.placement import Placement
    from swapper.scheduling.runtime import ModelRuntime

__all__ = [
    "GpuBudgetSnapshot",
    "ModelLoad",
    "ModelSnapshot",
    "Snapshot",
    "VramSnapshot",
    "model_snapshot",
    "vram_snapshot",
]


class ModelSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One configured model as the coordinator sees it."""

    status: ModelStatus
    backend: str
    pid: int | None
    port: int | None
    #: Epoch seconds.
    loaded_at: float | None
    last_error: str | None
    in_flight: int
    queued: int
    #: Epoch seconds of the last request that used it.
    last_used: float | None
    failures: int
    #: ``time.monotonic()`` at which a backed-off model may be tried again.
    retry_at: float | None
    #: MiB measured (or reported by the backend) while LOADED, or while SLEEPING; else None.
    vram_mb: float | None
    predicted_vram_mb: float
    pinned: bool
    #: Seconds idle before it unloads (its ttl, or a client's keep_alive); None: never.
    idle_ttl: float | None = None
    #: NVML indexes of the GPUs it is placed on (while it holds memory, or was last placed on);
    #: None without GPU accounting.
    gpus: list[int] | None = None


class GpuBudgetSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU's budget in placement's accounting, in MiB; NVML's figures where it answered."""

    #: NVML's index (as in ``CUDA_VISIBLE_DEVICES`` under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``).
    index: int
    name: str | None
    #: What models may use on this GPU together; None: unknown.
    budget_mb: float | None
    #: What the models placed on this GPU are charged on it (a split model: its share).
    committed_mb: float
    #: Ids of the models holding memory on this GPU.
    models: list[str]
    total_mb: float | None = None
    used_mb: float | None = None


class VramSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Placement's accounting, in MiB."""

    #: What models may use together; None: unknown (no GPU, no configured budget).
    budget_mb: float | None
    #: What the models holding VRAM are charged.
    committed_mb: float
    #: Sizes measured on earlier loads, by model id.
    learned_mb: dict[str, float]
    #: Each GPU's own budget; empty when no GPU is known (one budget, or none, then).
    gpus: list[GpuBudgetSnapshot] = []


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The coordinator's whole state at one moment."""

    mode: str
    active_model: str | None
    resident: list[str]
    max_concurrent_models: int
    vram: VramSnapshot
    models: dict[str, ModelSnapshot]
    #: Both clocks when it was taken, to turn a monotonic deadline into wall time.
    wall_time: float
    monotonic_time: float


class ModelLoad(msgspec.Struct, frozen=True):
    """What a metrics scrape reads of one model: its status and its requests."""

    status: ModelStatus
    queued: int
    in_flight: int


def model_snapshot(model: ModelRuntime, placement: Placement) -> ModelSnapshot:
    """One model's runtime state and placement's view of it."""
    handle = model.handle
    return ModelSnapshot(
        status=model.status,
        backend=model.backend.name,
        pid=handle.pid if handle else None,
        port=handle.port if handle else None,
        loaded_at=model.loaded_at,
        last_error=model.last_error,
        in_flight=model.in_flight,
        queued=model.queued,
        last_used=model.last_used,
        failures=model.failures,
        retry_at=model.retry_at,
        vram_mb=model.shown_vram_mb,
        predicted_vram_mb=placement.predicted_mb(model),
        pinned=placement.pinned(model),
        idle_ttl=model.idle.ttl(),
        gpus=list(model.gpus) if placement.per_gpu and model.gpus else None,
    )


def vram_snapshot(placement: Placement, holders: list[ModelRuntime]) -> VramSnapshot:
    """Placement's accounting of the models holding memory, node-wide and per GPU."""
    return VramSnapshot(
        budget_mb=placement.budget_mb,
        committed_mb=sum(m.charge_mb for m in holders),
        learned_mb=placement.sizes.snapshot(),
        gpus=_gpu_budgets(placement, holders),
    )


def _gpu_budgets(placement: Placement, holders: list[ModelRuntime]) -> list[GpuBudgetSnapshot]:
    """Each GPU's budget, what the models holding memory are charged on it, and who they are;
    empty when no GPU is known."""
    if not placement.per_gpu:
        return []
    budgets = placement.budgets()
    snapshots = []
    for device in placement.devices:
        on = [m for m in holders if device.index in m.gpus]
        read = placement.last_read.get(device.index)
        snapshots.append(
            GpuBudgetSnapshot(
                index=device.index,
                name=device.name,
                budget_mb=budgets.get(device.index),
                committed_mb=sum(m.charge_mb / len(m.gpus) for m in on),
                models=sorted(m.id for m in on),
                total_mb=device.total_mb,
                used_mb=read.used_mb if read is not None else None,
            )
        )
    return snapshots
