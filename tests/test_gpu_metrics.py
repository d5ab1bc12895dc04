"""``/metrics`` per GPU: NVML's memory, placement's budget and commitments, and which GPUs each
model is on; no series at all without GPUs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from swapper.gpu import GpuStats
from swapper.http.metrics import gpu_families
from swapper.scheduling.snapshot import VramSnapshot
from tests.fakes import FakeWorld
from tests.gpu_snapshots import TWO_GPU_NVML, served_with_two_gpus, two_gpu_vram

MIB = 1024 * 1024
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Families(Collector):
    """A collector of what :func:`gpu_families` renders for one reading and one snapshot."""

    def __init__(self, gpus: list[GpuStats], vram: VramSnapshot) -> None:
        self.gpus, self.vram = gpus, vram

    def collect(self) -> Iterator[Metric]:
        """The per-GPU families."""
        return gpu_families(self.gpus, self.vram)


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def rendered(gpus: list[GpuStats], vram: VramSnapshot) -> Samples:
    registry = CollectorRegistry()
    registry.register(Families(gpus, vram))
    return samples(generate_latest(registry).decode())


def gpu_series(got: Samples) -> Samples:
    return {k: v for k, v in got.items() if "gpu" in k[0]}


TWO_GPU_SERIES: Samples = {
    ("swapper_gpu_memory_used_bytes", (("gpu", "0"),)): 15100.6 * MIB,
    ("swapper_gpu_memory_used_bytes", (("gpu", "1"),)): 21001.4 * MIB,
    ("swapper_gpu_memory_total_bytes", (("gpu", "0"),)): 24564.2 * MIB,
    ("swapper_gpu_memory_total_bytes", (("gpu", "1"),)): 24576.0 * MIB,
    ("swapper_gpu_budget_bytes", (("gpu", "0"),)): 23040.04 * MIB,
    ("swapper_gpu_budget_bytes", (("gpu", "1"),)): 23040.0 * MIB,
    ("swapper_gpu_committed_bytes", (("gpu", "0"),)): 14336.42 * MIB,
    ("swapper_gpu_committed_bytes", (("gpu", "1"),)): 20480.0 * MIB,
    ("swapper_model_gpu_info", (("gpu", "0"), ("model", "qwen-14b"))): 1.0,
    ("swapper_model_gpu_info", (("gpu", "0"), ("model", "big-70b"))): 1.0,
    ("swapper_model_gpu_info", (("gpu", "1"), ("model", "big-70b"))): 1.0,
}


def test_each_gpu_has_its_memory_budget_commitments_and_models() -> None:
    got = rendered(TWO_GPU_NVML, two_gpu_vram())
    assert got == pytest.approx(TWO_GPU_SERIES)
    # embed holds nothing: it is on no GPU, whatever its last placement was.
    assert not [labels for (_, labels) in got if ("model", "embed") in labels]


def test_no_gpu_means_no_gpu_series() -> None:
    assert rendered([], VramSnapshot(budget_mb=None, committed_mb=0.0, learned_mb={})) == {}
    # NVML answered but placement keeps one budget: memory only, no made-up per-GPU budgets.
    one_budget = VramSnapshot(budget_mb=16000.0, committed_mb=0.0, learned_mb={})
    assert {name for name, _ in rendered(TWO_GPU_NVML, one_budget)} == {
        "swapper_gpu_memory_used_bytes",
        "swapper_gpu_memory_total_bytes",
    }


def test_a_gpu_of_unknown_budget_has_no_budget_series() -> None:
    vram = two_gpu_vram()
    unknown = msgspec.structs.replace(vram.gpus[1], budget_mb=None)
    got = rendered([], msgspec.structs.replace(vram, gpus=[vram.gpus[0], unknown]))
    budgets = {labels for (name, labels) in got if name == "swapper_gpu_budget_bytes"}
    assert budgets == {(("gpu", "0"),)}
    assert got[("swapper_gpu_committed_bytes", (("gpu", "1"),))] == 20480.0 * MIB


def test_the_metrics_endpoint_shows_each_gpu(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with served_with_two_gpus(world, monkeypatch, tmp_path) as url:
        response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    got = samples(response.text)
    assert gpu_series(got) == pytest.approx(TWO_GPU_SERIES)
    assert got[("swapper_model_status", (("model", "embed"), ("status", "UNLOADED")))] == 1
