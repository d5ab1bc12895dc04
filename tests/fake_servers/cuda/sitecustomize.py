"""A fake CUDA driver: ``ctypes.CDLL("libcuda.so.1")`` answers from the fake GPU.

Put this folder on PYTHONPATH (with ``tests/fake_servers/nvml`` for NVML) and a process that
drives the CUDA driver API through ctypes, like ``scripts/vram_holder.py``, allocates on the
fake GPU in ``$SWAPPER_FAKE_GPU_DIR`` instead: what it allocates is held by its pid, as NVML
then reports, and freed when it exits (after the fake GPU's release lag). Only the calls the
holder and ``scripts/gpu_check.py`` make exist; any other raises AttributeError, as a missing
symbol would. CUDA's devices are the fake GPU's: those ``CUDA_VISIBLE_DEVICES`` names (see
``fakegpu.visible``), else all of them, from ordinal 0; each has its fake device's UUID, and
memory is held on the device whose primary context is current.

Unlike a ctypes function, which passes whatever it is given when ``argtypes`` is unset, every
entry point here insists on the real driver API's signature: a call before ``argtypes`` and
``restype`` are declared as ``cuda.h`` has them, or with an argument those types reject, raises
TypeError. A wrong declaration then fails here instead of corrupting memory on a real GPU.
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
_INVALID_DEVICE = 101  # CUDA_ERROR_INVALID_DEVICE
_real_cdll = ctypes.CDLL


class _Uuid(ctypes.Structure):
    """``CUuuid``: 16 bytes."""

    _fields_ = [("bytes", ctypes.c_char * 16)]


_c = ctypes
#: cuda.h's signatures. CUdevice is int, CUcontext a pointer, CUdeviceptr an unsigned 64-bit
#: integer; every function returns CUresult (an enum: int).
SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [_c.c_uint],
    "cuDeviceGetCount": [_c.POINTER(_c.c_int)],
    "cuDeviceGet": [_c.POINTER(_c.c_int), _c.c_int],
    "cuDeviceGetName": [_c.c_char_p, _c.c_int, _c.c_int],
    "cuDeviceGetUuid": [_c.POINTER(_Uuid), _c.c_int],
    "cuDeviceGetUuid_v2": [_c.POINTER(_Uuid), _c.c_int],
    "cuDevicePrimaryCtxRetain": [_c.POINTER(_c.c_void_p), _c.c_int],
    "cuCtxSetCurrent": [_c.c_void_p],
    "cuCtxSynchronize": [],
    "cuMemGetInfo_v2": [_c.POINTER(_c.c_size_t), _c.POINTER(_c.c_size_t)],
    "cuMemAlloc_v2": [_c.POINTER(_c.c_uint64), _c.c_size_t],
    "cuMemsetD8_v2": [_c.c_uint64, _c.c_ubyte, _c.c_size_t],
    "cuGetErrorName": [_c.c_int, _c.POINTER(_c.c_char_p)],
}


def _same_type(declared: Any, real: Any) -> bool:
    """Whether a declared ctypes type is ABI-equal to the real one (c_ulong is c_uint64 ...)."""
    if declared is real:
        return True
    if isinstance(real, type) and issubclass(real, _c.Structure):
        return isinstance(declared, type) and issubclass(declared, (_c.Structure, _c.Array)) \
            and _c.sizeof(declared) == _c.sizeof(real)
    pointer = type(_c.POINTER(_c.c_int))
    if isinstance(real, pointer):
        return isinstance(declared, pointer) and _same_type(declared._type_, real._type_)
    simple = type(_c.c_int)
    if isinstance(real, simple) and isinstance(declared, simple) and real._type_ not in "zPO":
        # Same size and signedness (ctypes type codes: upper case is unsigned).
        return declared._type_ not in "zPO" and _c.sizeof(declared) == _c.sizeof(real) \
            and declared._type_.isupper() == real._type_.isupper()
    return False


class _Function:
    """A driver entry point that checks its declared signature and each argument, then runs."""

    def __init__(self, name: str, body: Any) -> None:
        self.name = name
        self.body = body
        self.argtypes: Any = None  # as a fresh ctypes function: nothing declared
        self.restype: Any = ctypes.c_int

    def __call__(self, *args: Any) -> int:
        real = SIGNATURES[self.name]
        declared = self.argtypes
        if declared is None or len(declared) != len(real) \
                or not all(_same_type(d, r) for d, r in zip(declared, real, strict=True)):
            raise TypeError(f"fake CUDA: {self.name} called with argtypes {declared!r}; the "
                            f"driver API needs {real!r}")
        if self.restype is not ctypes.c_int and not _same_type(self.restype, ctypes.c_int):
            raise TypeError(f"fake CUDA: {self.name} has restype {self.restype!r}; CUresult is "
                            f"c_int")
        if len(args) != len(real):
            raise TypeError(f"fake CUDA: {self.name} takes {len(real)} arguments "
                            f"({len(args)} given)")
        for position, (argtype, arg) in enumerate(zip(declared, args, strict=True)):
            try:
                argtype.from_param(arg)  # what ctypes itself does with argtypes set
            except (TypeError, ctypes.ArgumentError) as exc:
                raise ctypes.ArgumentError(f"fake CUDA: {self.name} argument {position + 1}: "
                                           f"{exc}") from exc
        return int(self.body(*args))


def _set(ref: Any, value: int) -> None:
    """Write through a ``ctypes.byref`` argument (or a pointer)."""
    target = getattr(ref, "_obj", None)
    if target is None:
        target = ref.contents
    target.value = value


def _int(value: Any) -> int:
    """A CUdevice as given: a plain int, or a ctypes c_int."""
    return int(getattr(value, "value", value))


class _FakeCuda:
    def __init__(self) -> None:
        self.held: dict[int, float] = {}  # fake device -> MiB this process holds there
        self.current = 0  # the fake device of the current context
        self.next_pointer = 0x7F0000000000
        for name in SIGNATURES:
            setattr(self, name, _Function(name, getattr(self, "_" + name)))

    @staticmethod
    def _visible() -> list[int]:
        """The fake devices CUDA shows, by ordinal."""
        named = fakegpu.visible()
        return named if named is not None else list(range(len(fakegpu.devices())))

    def _device(self, ordinal: Any) -> fakegpu.Snapshot:
        return fakegpu.snapshot(device=self._visible()[_int(ordinal)])

    def _hold(self, mb: float) -> None:
        self.held[self.current] = self.held.get(self.current, 0.0) + mb
        fakegpu.hold_devices(self.held)

    def _cuInit(self, flags: int) -> int:
        return 0

    def _cuDeviceGetCount(self, count: Any) -> int:
        _set(count, len(self._visible()))
        return 0

    def _cuDeviceGet(self, device: Any, ordinal: int) -> int:
        if not 0 <= ordinal < len(self._visible()):
            return _INVALID_DEVICE
        _set(device, ordinal)
        return 0

    def _cuDeviceGetUuid(self, uuid: Any, device: int) -> int:
        target = getattr(uuid, "_obj", None) or uuid.contents
        raw = bytes.fromhex(self._device(device).uuid.removeprefix("GPU-").replace("-", ""))
        ctypes.memmove(ctypes.addressof(target), raw, 16)
        return 0

    def _cuDeviceGetUuid_v2(self, uuid: Any, device: int) -> int:
        return self._cuDeviceGetUuid(uuid, device)

    def _cuDeviceGetName(self, buffer: Any, length: int, device: int) -> int:
        buffer.value = self._device(device).name.encode()[: length - 1]
        return 0

    def _cuDevicePrimaryCtxRetain(self, context: Any, device: int) -> int:
        self.current = self._visible()[_int(device)]
        self._hold(_CONTEXT_MB)
        _set(context, 1)
        return 0

    def _cuCtxSetCurrent(self, context: Any) -> int:
        return 0

    def _cuCtxSynchronize(self) -> int:
        return 0

    def _cuMemGetInfo_v2(self, free: Any, total: Any) -> int:
        snapshot = fakegpu.snapshot(device=self.current)
        _set(free, int(snapshot.free_mb * _MIB))
        _set(total, int(snapshot.total_mb * _MIB))
        return 0

    def _cuMemAlloc_v2(self, pointer: Any, size: int) -> int:
        if size / _MIB > fakegpu.snapshot(device=self.current).free_mb:
            return _OUT_OF_MEMORY
        self._hold(size / _MIB)
        _set(pointer, self.next_pointer)
        self.next_pointer += size
        return 0

    def _cuMemsetD8_v2(self, pointer: int, value: int, size: int) -> int:
        return 0

    def _cuGetErrorName(self, code: int, text: Any) -> int:
        names = {_OUT_OF_MEMORY: b"CUDA_ERROR_OUT_OF_MEMORY",
                 _INVALID_DEVICE: b"CUDA_ERROR_INVALID_DEVICE"}
        _set(text, names.get(code, b"CUDA_ERROR_UNKNOWN"))
        return 0


def _cdll(name: str, *args: Any, **kwargs: Any) -> Any:
    if name == "libcuda.so.1" and fakegpu.configured():
        return _FakeCuda()
    return _real_cdll(name, *args, **kwargs)


ctypes.CDLL = _cdll  # type: ignore[misc]
