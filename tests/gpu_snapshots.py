"""Coordinator snapshots of a node with two GPUs, built directly, for the per-GPU renderers.

Placement on several GPUs fills these sections for real; the renderers (``/status``,
``/metrics``, the dashboard, ``swapper status``) are tested here on snapshots of known content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from swapper.gpu import GpuStats
from swapper.scheduling.coordinator import SwapCoordinator
from swapper.scheduling.model_state import ModelStatus
from swapper.scheduling.snapshot import GpuBudgetSnapshot, ModelSnapshot, Snapshot, VramSnapshot
from tests.conftest import fake_config, served_in_thread
from tests.fakes import FakeGpu, FakeWorld

__all__ = [
    "TWO_GPU_MODELS",
    "TWO_GPU_NVML",
    "TwoGpus",
    "fake_model",
    "report_two_gpus",
    "served_with_two_gpus",
    "two_gpu_snapshot",
    "two_gpu_vram",
]

#: NVML's reading of the two GPUs, as ``GpuMonitor.gpus()`` returns it.
TWO_GPU_NVML = [
    GpuStats(0, "NVIDIA RTX 4090", 24564.2, 15100.6, 9463.6),
    GpuStats(1, "NVIDIA RTX 3090", 24576.0, 21001.4, 3574.6),
]


def fake_model(**raw: Any) -> ModelSnapshot:
    """An unloaded ``fake`` model, with ``raw`` fields replacing the defaults."""
    fields: dict[str, Any] = {
        "status": ModelStatus.UNLOADED,
        "backend": "fake",
        "pid": None,
        "port": None,
        "loaded_at": None,
        "last_error": None,
        "in_flight": 0,
        "queued": 0,
        "last_used": None,
        "failures": 0,
        "retry_at": None,
        "vram_mb": None,
        "predicted_vram_mb": 0.0,
        "pinned": False,
    }
    return ModelSnapshot(**{**fields, **raw})


def two_gpu_vram() -> VramSnapshot:
    """qwen-14b on GPU 0, big-70b split over GPUs 0 and 1; embed holds nothing."""
    return VramSnapshot(
        budget_mb=46080.04,
        committed_mb=34816.42,
        learned_mb={"qwen-14b": 9216.42},
        gpus=[
            GpuBudgetSnapshot(
                index=0,
                name="NVIDIA RTX 4090",
                budget_mb=23040.04,
                committed_mb=14336.42,
                models=["qwen-14b", "big-70b"],
                total_mb=24564.0,
                used_mb=15000.0,
            ),
            GpuBudgetSnapshot(
                index=1,
                name="NVIDIA RTX 3090",
                budget_mb=23040.0,
                committed_mb=20480.0,
                models=["big-70b"],
                total_mb=24576.0,
                used_mb=21000.0,
            ),
        ],
    )


def two_gpu_snapshot() -> Snapshot:
    """Two GPUs, a model on each, one split over both and one unloaded (last placed on GPU 1)."""
    return Snapshot(
        mode="multi",
        active_model="big-70b",
        resident=["qwen-14b", "big-70b"],
        max_concurrent_models=3,
        vram=two_gpu_vram(),
        models={
            "qwen-14b": fake_model(
                status=ModelStatus.LOADED,
                pid=4101,
                port=41001,
                vram_mb=9216.42,
                predicted_vram_mb=9216.42,
                gpus=[0],
            ),
            "big-70b": fake_model(
                status=ModelStatus.LOADED,
                pid=4102,
                port=41002,
                vram_mb=25600.0,
                predicted_vram_mb=25600.0,
                gpus=[0, 1],
            ),
            "embed": fake_model(predicted_vram_mb=512.0, gpus=[1]),
        },
        wall_time=1_700_000_200.0,
        monotonic_time=1000.0,
    )


#: The models of :func:`two_gpu_snapshot`, for a config of fake backends.
TWO_GPU_MODELS = {"qwen-14b": {}, "big-70b": {}, "embed": {}}


def report_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every coordinator's snapshot carry :func:`two_gpu_snapshot`'s GPU sections.

    A status source for the edges until placement fills them itself: the rest of the snapshot
    (statuses, pids) stays the running coordinator's own.
    """
    real = SwapCoordinator.status
    placed = two_gpu_snapshot()

    def status(self: SwapCoordinator) -> Snapshot:
        snapshot = real(self)
        models = {
            model_id: msgspec.structs.replace(
                model, gpus=placed.models[model_id].gpus if model_id in placed.models else None
            )
            for model_id, model in snapshot.models.items()
        }
        return msgspec.structs.replace(snapshot, vram=placed.vram, models=models)

    monkeypatch.setattr(SwapCoordinator, "status", status)


class TwoGpus(FakeGpu):
    """A fake NVML that reads :data:`TWO_GPU_NVML`."""

    def gpus(self) -> list[GpuStats]:
        """Both GPUs' memory."""
        return list(TWO_GPU_NVML)

    def totals_mb(self) -> tuple[float, float, float]:
        """Total, used and free MiB over both GPUs."""
        return (
            sum(g.total_mb for g in TWO_GPU_NVML),
            sum(g.used_mb for g in TWO_GPU_NVML),
            sum(g.free_mb for g in TWO_GPU_NVML),
        )


@contextlib.contextmanager
def served_with_two_gpus(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """swapper in-process on fake backends, reading :class:`TwoGpus` and reporting
    :func:`two_gpu_snapshot`'s GPU sections; its URL."""
    import swapper.http.app

    monkeypatch.setattr(swapper.http.app, "GpuMonitor", lambda: TwoGpus(world))
    report_two_gpus(monkeypatch)
    config, registry = fake_config(
        world, TWO_GPU_MODELS, swapper={"state_file": str(tmp_path / "state.json")}
    )
    with served_in_thread(swapper.http.app.create_app(config, registry)) as url:
        yield url
