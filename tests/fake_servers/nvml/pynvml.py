"""A fake ``pynvml`` (nvidia-ml-py) backed by the fake GPU of ``fakegpu.py``.

Only the calls swapper makes. This directory goes on the PYTHONPATH of a swapper subprocess so
that ``import pynvml`` finds this module instead of the real one; nothing else imports it.
Without ``$SWAPPER_FAKE_GPU_DIR`` (or its gpu.json) ``nvmlInit`` fails like a machine with no
NVIDIA driver: ``NVMLError_LibraryNotFound``.

Knobs (environment, read at each call):
  FAKE_NVML_PID_OFFSET (0)   report every pid plus this: the host PIDs NVML gives a process in a
                             container with its own PID namespace, none of which is ours
  FAKE_NVML_OTHER_GPUS (0)   that many idle GPUs come first in NVML's order, so the fake GPU's
                             device i is NVML index N + i; CUDA (the fake driver) sees only the
                             fake GPU's devices, from ordinal 0, as under ``CUDA_VISIBLE_DEVICES=N``
  FAKE_NVML_MIG (unset)      "1": MIG mode is enabled on the fake GPU's devices

A fake GPU of several devices (``fakegpu.setup(..., devices=2)``) shows as that many GPUs, each
with its own total, used memory, UUID and processes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/fake_servers
import fakegpu

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_UNKNOWN = 999

_MIB = 1024 * 1024


class NVMLError(Exception):
    """Base of every NVML error; ``value`` is the NVML error code, as in the real module."""

    value = NVML_ERROR_UNKNOWN
    text = "Unknown Error"

    def __init__(self, value: int | None = None) -> None:
        if value is not None:
            self.value = value
        super().__init__(self.text)

    def __str__(self) -> str:
        return self.text


class NVMLError_Uninitialized(NVMLError):
    value = NVML_ERROR_UNINITIALIZED
    text = "Uninitialized"


class NVMLError_InvalidArgument(NVMLError):
    value = NVML_ERROR_INVALID_ARGUMENT
    text = "Invalid Argument"


class NVMLError_NotSupported(NVMLError):
    value = NVML_ERROR_NOT_SUPPORTED
    text = "Not Supported"


class NVMLError_DriverNotLoaded(NVMLError):
    value = NVML_ERROR_DRIVER_NOT_LOADED
    text = "Driver Not Loaded"


class NVMLError_LibraryNotFound(NVMLError):
    value = NVML_ERROR_LIBRARY_NOT_FOUND
    text = "NVML Shared Library Not Found"


@dataclass(frozen=True)
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int | None


@dataclass(frozen=True)
class _Handle:
    index: int


_init_count = 0  # the real library counts nvmlInit/nvmlShutdown pairs


def _check_init() -> None:
    if _init_count <= 0:
        raise NVMLError_Uninitialized()


def _devices() -> list[fakegpu.Snapshot]:
    try:
        return fakegpu.devices()
    except (OSError, ValueError, RuntimeError) as exc:  # gpu.json removed under us
        raise NVMLError_DriverNotLoaded() from exc


def _snapshot(handle: _Handle) -> fakegpu.Snapshot:
    """The fake device behind ``handle`` (an idle GPU has none)."""
    return _devices()[handle.index - _others()]


def nvmlInit() -> None:
    global _init_count
    if not fakegpu.configured():
        raise NVMLError_LibraryNotFound()
    _init_count += 1


def nvmlShutdown() -> None:
    global _init_count
    _check_init()
    _init_count -= 1


def nvmlSystemGetDriverVersion() -> str:
    """The driver's version string (a str in nvidia-ml-py >= 11.515)."""
    _check_init()
    return "550.0-fake"


NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1


def _knob(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def _others() -> int:
    return max(0, _knob("FAKE_NVML_OTHER_GPUS"))


def _is_fake(handle: _Handle) -> bool:
    return handle.index >= _others()


def _count() -> int:
    return _others() + len(_devices())


def _idle_uuid(index: int) -> str:
    return f"GPU-1d1e0000-0000-4000-8000-{index:012x}"


def nvmlDeviceGetCount() -> int:
    _check_init()
    return _count()


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    _check_init()
    if not 0 <= index < _count():
        raise NVMLError_InvalidArgument()
    return _Handle(index)


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> _Handle:
    _check_init()
    wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
    for index in range(_count()):
        if nvmlDeviceGetUUID(_Handle(index)) == wanted:
            return _Handle(index)
    raise NVMLError_InvalidArgument()


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    _check_init()
    return _snapshot(handle).uuid if _is_fake(handle) else _idle_uuid(handle.index)


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:
    """[current, pending]; a GPU without MIG support raises NotSupported, as consumer GPUs do."""
    _check_init()
    if not _is_fake(handle):
        raise NVMLError_NotSupported()
    mode = (
        NVML_DEVICE_MIG_ENABLE
        if os.environ.get("FAKE_NVML_MIG") == "1"
        else NVML_DEVICE_MIG_DISABLE
    )
    return [mode, mode]


def nvmlDeviceGetName(handle: _Handle) -> str:
    _check_init()
    return _snapshot(handle).name if _is_fake(handle) else f"Fake idle GPU {handle.index}"


def nvmlDeviceGetMemoryInfo(handle: _Handle) -> c_nvmlMemory_t:
    _check_init()
    if not _is_fake(handle):
        total = int(_devices()[0].total_mb * _MIB)  # idle GPUs: the size of the first fake one
        return c_nvmlMemory_t(total=total, free=total, used=0)
    snap = _snapshot(handle)
    total = int(snap.total_mb * _MIB)
    used = min(total, int(snap.used_mb * _MIB))
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    _check_init()
    if not _is_fake(handle):
        return []
    offset = _knob("FAKE_NVML_PID_OFFSET")
    return [
        c_nvmlProcessInfo_t(pid + offset, int(mb * _MIB))
        for pid, mb in sorted(_snapshot(handle).processes.items())
    ]
