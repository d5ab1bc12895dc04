"""swapper counts only the GPUs CUDA can see: those ``CUDA_VISIBLE_DEVICES`` names, when set.

The monitor runs in-process on the fake ``pynvml``, whose ``FAKE_NVML_OTHER_GPUS`` puts an idle
16 GiB GPU at NVML index 0 before the fake GPU (index 1).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from swapper.gpu import GpuMonitor
from tests.conftest import FAKES
from tests.fake_servers import fakegpu

FAKE_UUID = "GPU-5a5a5a5a-0000-4000-8000-000000000001"


@pytest.fixture
def nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake pynvml as ``pynvml``, one idle GPU before a fake GPU of which we hold 3000 MiB."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKES / "nvml" / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts tests/fake_servers on the path
    monkeypatch.setitem(
        sys.modules, "pynvml", module
    )  # before running it: its dataclasses look it up
    spec.loader.exec_module(module)
    directory = tmp_path / "gpu"
    fakegpu.setup(directory, total_mb=16384, uuid=FAKE_UUID)
    fakegpu.hold(3000, directory)
    monkeypatch.setenv(fakegpu.ENV, str(directory))
    monkeypatch.setenv("FAKE_NVML_OTHER_GPUS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("FAKE_NVML_PID_OFFSET", raising=False)
    return directory


@pytest.mark.parametrize("visible", ["1", FAKE_UUID, FAKE_UUID[:12], " 1 ,7"])
def test_only_the_gpus_cuda_visible_devices_names_count(
    nvml: Path,
    monkeypatch: pytest.MonkeyPatch,
    visible: str,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpu = GpuMonitor()
    assert [(g.index, g.total_mb, g.used_mb) for g in gpu.gpus()] == [(1, 16384, 3000)]
    assert gpu.totals_mb() == (16384, 3000, 13384)
    assert gpu.process_memory_mb(os.getpid()) == 3000


def test_every_gpu_counts_without_cuda_visible_devices(nvml: Path) -> None:
    gpu = GpuMonitor()
    assert [g.index for g in gpu.gpus()] == [0, 1]
    assert gpu.totals_mb() == (2 * 16384, 3000, 2 * 16384 - 3000)


@pytest.mark.parametrize(
    ("visible", "indexes"), [("0", [0]), ("1,0", [1, 0]), ("-1", []), ("", []), ("GPU-nope,1", [])]
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(
    nvml: Path,
    monkeypatch: pytest.MonkeyPatch,
    visible: str,
    indexes: list[int],
) -> None:
    # The list ends at the first entry that names no GPU, as it does for CUDA.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpu = GpuMonitor()
    assert [g.index for g in gpu.gpus()] == indexes
    if not indexes:
        assert gpu.totals_mb() is None
