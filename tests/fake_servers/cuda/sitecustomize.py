"""A fake CUDA driver: ``ctypes.CDLL("libcuda.so.1")`` answers from the fake GPU.

Put this folder on PYTHONPATH (with ``tests/fake_servers/nvml`` for NVML) and a process that
drives the CUDA driver API through ctypes, like ``scripts/vram_holder.py``, allocates on the
fake GPU in ``$SWAPPER_FAKE_GPU_DIR`` instead: what it allocates is held by its pid, as NVML
then reports, and freed when it exits (after the fake GPU's release lag). Only the calls the
holder makes exist; any other raises AttributeError, as a missing symbol would.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fakegpu  # noqa: E402 - found through the path set just above

_MIB = 1024 * 1024
#: What a CUDA context takes on the device before anything is allocated.
_CONTEXT_MB = 512.0
_OUT_OF_MEMORY = 2  # CUDA_ERROR_OUT_OF_MEMORY
_real_cdll = ctypes.CDLL


class _Function:
    """A driver entry point: takes argtypes/restype like a ctypes function, and ignores them."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.argtypes: list[Any] = []
        self.restype: Any = ctypes.c_int

    def __call__(self, *args: Any) -> int:
        return int(self.body(*args))


def _set(ref: Any, value: int) -> None:
    """Write through a ``ctypes.byref`` argument (or a pointer)."""
    target = getattr(ref, "_obj", None)
    if target is None:
        target = ref.contents
    target.value = value


class _FakeCuda:
    def __init__(self) -> None:
        self.held_mb = 0.0
        self.next_pointer = 0x7F0000000000
        for name in ("cuInit", "cuDeviceGet", "cuDeviceGetName", "cuDevicePrimaryCtxRetain",
                     "cuCtxSetCurrent", "cuCtxSynchronize", "cuMemGetInfo_v2", "cuMemAlloc_v2",
                     "cuMemsetD8_v2", "cuGetErrorName"):
            setattr(self, name, _Function(getattr(self, "_" + name)))

    def _hold(self, mb: float) -> None:
        self.held_mb += mb
        fakegpu.hold(self.held_mb)

    def _cuInit(self, flags: int) -> int:
        return 0

    def _cuDeviceGet(self, device: Any, ordinal: int) -> int:
        _set(device, ordinal)
        return 0

    def _cuDeviceGetName(self, buffer: Any, length: int, device: int) -> int:
        buffer.value = fakegpu.snapshot().name.encode()[: length - 1]
        return 0

    def _cuDevicePrimaryCtxRetain(self, context: Any, device: int) -> int:
        self._hold(_CONTEXT_MB)
        _set(context, 1)
        return 0

    def _cuCtxSetCurrent(self, context: Any) -> int:
        return 0

    def _cuCtxSynchronize(self) -> int:
        return 0

    def _cuMemGetInfo_v2(self, free: Any, total: Any) -> int:
        snapshot = fakegpu.snapshot()
        _set(free, int(snapshot.free_mb * _MIB))
        _set(total, int(snapshot.total_mb * _MIB))
        return 0

    def _cuMemAlloc_v2(self, pointer: Any, size: int) -> int:
        if size / _MIB > fakegpu.snapshot().free_mb:
            return _OUT_OF_MEMORY
        self._hold(size / _MIB)
        _set(pointer, self.next_pointer)
        self.next_pointer += size
        return 0

    def _cuMemsetD8_v2(self, pointer: int, value: int, size: int) -> int:
        return 0

    def _cuGetErrorName(self, code: int, text: Any) -> int:
        _set(text, b"CUDA_ERROR_OUT_OF_MEMORY" if code == _OUT_OF_MEMORY else b"CUDA_ERROR_UNKNOWN")
        return 0


def _cdll(name: str, *args: Any, **kwargs: Any) -> Any:
    if name == "libcuda.so.1" and fakegpu.configured():
        return _FakeCuda()
    return _real_cdll(name, *args, **kwargs)


ctypes.CDLL = _cdll  # type: ignore[misc]
