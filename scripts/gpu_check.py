#!/usr/bin/env python3
"""``just gpu-check``: swapper's VRAM placement on a real NVIDIA GPU, measured with NVML.

It starts swapper in ``multi-active`` mode with three models ``a``, ``b`` and ``c``, each served
by ``scripts/vram_holder.py`` (a stand-in for ``vllm serve`` that really takes
``gpu_memory_utilization`` x total VRAM through the CUDA driver), sized so that any two fit
under ``swapper.vram_budget_mb`` and three do not. Then:

1. baseline: what NVML sees before anything runs;
2. load ``a`` and ``b``: both resident; swapper's ``vram_mb`` against NVML's per-process figure;
3. a chat to ``a`` (so ``b`` is least recently used), then load ``c``: swapper must evict ``b``
   to stay under the budget, and ``c`` may start only once ``b``'s memory is really free again:
   with ``a`` and ``b`` resident the GPU's free memory is below what ``c`` asks for, and the
   holder, like vLLM, refuses to start then. NVML is sampled every 0.1 s meanwhile: in that
   timeline ``c``'s process must appear only after ``b``'s memory shows free (pids are told
   apart by coming and going, so host PIDs seen from a container do not matter);
4. swapper's log lines about waiting for GPU memory and about eviction (shown, not judged);
5. restart swapper: the learned sizes are in ``/status``'s ``vram.learned_mb`` and the state file;
6. stop swapper: no holder process is left and NVML's used memory is back near the baseline;
7. on a machine with two or more GPUs (those ``CUDA_VISIBLE_DEVICES`` names, if set): a fresh
   swapper with two holders of ``--two-gpu-fraction`` each, placed ``auto``: two cannot share
   one GPU's budget, so each must go on a GPU of its own, and NVML must show each GPU's used
   memory grown by about a holder's share (one on each), with none evicted.

Steps 2-5 pin ``a``, ``b`` and ``c`` to the watched GPU (``gpus: [index]``), so the budget,
which applies per GPU, is judged on one GPU even where there are several.

The GPU watched is the one the holders allocate on, CUDA's device 0, found in NVML by UUID, so
``CUDA_VISIBLE_DEVICES`` may remap indexes. A GPU in MIG mode is refused: NVML's memory and
process figures are for the whole GPU, not the slice CUDA sees.

It ends with PASS/FAIL per check and exits 0 only when all pass. Without an NVIDIA GPU and
driver it says so in one line and exits 1. Every wait has a deadline and the whole run is
bounded by ``--time-limit``; swapper and the holders are stopped whatever happens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOLDER = REPO / "scripts" / "vram_holder.py"
MODELS = ("a", "b", "c")
#: How swapper is run: this interpreter, so the check uses the venv it was started from.
SWAPPER_COMMAND = [sys.executable, "-m", "swapper"]
_MIB = 1024 * 1024
_START = time.monotonic()
#: Log lines worth showing: the wait for released memory, eviction, the budget, learned sizes,
#: and each holder's startup line (the free memory it found) or vLLM-style refusal.
_LOG_PATTERN = re.compile(
    r"for GPU memory|[Ee]vict|[Bb]udget|[Ll]earn|state file|VRAM"
    r"|taking \d+ MiB|Free memory on device"
)
#: How far above the baseline NVML's used memory may stay once everything has stopped.
_BASELINE_SLACK_MB = 1024.0

CHECK_NAMES = (
    "a and b resident together",
    "b evicted (least recently used) to fit c, a kept",
    "c resident",
    "b's process gone",
    "c started only after b's memory showed free (NVML timeline)",
    "learned VRAM sizes recorded",
    "no stray holder processes",
    "NVML used memory back near baseline",
)
#: Only on a machine with two or more GPUs (step 7).
TWO_GPU_CHECK = "two models on two GPUs, NVML shows memory on each"


# --- output ---------------------------------------------------------------------------------


def step(message: str) -> None:
    """A timestamped headline: wall clock and seconds since the check started."""
    print(
        f"\n[{time.strftime('%H:%M:%S')} +{time.monotonic() - _START:6.1f}s] {message}", flush=True
    )


def detail(message: str) -> None:
    """An indented line under the current step."""
    print(f"    {message}", flush=True)


# --- NVML -----------------------------------------------------------------------------------


class NoGpu(Exception):
    """NVML is missing or sees no GPU."""


class MigEnabled(NoGpu):
    """The GPU is in MIG mode: NVML's figures would not be the ones CUDA's slice sees."""


def cuda_device0_uuid() -> str | None:
    """The UUID of CUDA's device 0, which the holders allocate on; None without a CUDA driver.

    CUDA orders devices after ``CUDA_VISIBLE_DEVICES`` (and by default fastest first), NVML by
    PCI bus: only the UUID names the same GPU in both.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None

    class CUuuid(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_char * 16)]

    try:
        get_uuid = lib.cuDeviceGetUuid_v2
    except AttributeError:  # drivers before CUDA 11.4
        get_uuid = lib.cuDeviceGetUuid
    lib.cuInit.argtypes, lib.cuInit.restype = [ctypes.c_uint], ctypes.c_int
    lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.cuDeviceGet.restype = ctypes.c_int
    get_uuid.argtypes, get_uuid.restype = [ctypes.POINTER(CUuuid), ctypes.c_int], ctypes.c_int
    device, uuid = ctypes.c_int(), CUuuid()
    if (
        lib.cuInit(0) != 0
        or lib.cuDeviceGet(ctypes.byref(device), 0) != 0
        or get_uuid(ctypes.byref(uuid), device) != 0
    ):
        return None
    raw = ctypes.string_at(ctypes.addressof(uuid), 16).hex()
    return f"GPU-{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


@dataclass(frozen=True)
class Memory:
    """The GPU's memory as NVML reports it, in MiB."""

    total_mb: float
    used_mb: float
    free_mb: float

    def __str__(self) -> str:
        return (
            f"total {self.total_mb:.0f} MiB, used {self.used_mb:.0f} MiB, "
            f"free {self.free_mb:.0f} MiB"
        )


class Nvml:
    """CUDA device 0 (found in NVML by UUID) through pynvml (nvidia-ml-py): memory and per-process usage."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NoGpu(
                f"pynvml (nvidia-ml-py) is not importable by {sys.executable}: {exc}"
            ) from None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise NoGpu(str(exc) or type(exc).__name__) from None
        if count < 1:
            raise NoGpu("NVML sees no GPU")
        self._nv: Any = pynvml
        self.index, self.uuid, self.mapping = self._find_cuda_device(count)
        #: NVML indexes of the GPUs swapper counts (CUDA_VISIBLE_DEVICES's, when it is set).
        self.visible = self._visible_indexes(count)
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.name: str = name.decode() if isinstance(name, bytes) else name
        self.driver: str = str(pynvml.nvmlSystemGetDriverVersion())
        self._process_error_shown = False
        for index in range(count):
            self._refuse_mig(index)

    def _find_cuda_device(self, count: int) -> tuple[int, str, str]:
        """NVML index and UUID of CUDA's device 0, and how that was decided."""
        nv = self._nv
        uuids = []
        for index in range(count):
            uuid = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(index))
            uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        wanted = cuda_device0_uuid()
        if wanted is None:
            if count > 1 and visible:
                raise NoGpu(
                    f"cannot ask CUDA which GPU is its device 0 (no libcuda.so.1), and "
                    f"CUDA_VISIBLE_DEVICES={visible} may remap NVML's {count} GPUs"
                )
            return 0, uuids[0], "NVML index 0 (CUDA not asked: no libcuda.so.1)"
        if wanted in uuids:
            index = uuids.index(wanted)
            return index, wanted, f"CUDA device 0 is NVML index {index} ({wanted})"
        self._refuse_mig(None)
        raise NoGpu(f"CUDA's device 0 ({wanted}) is none of NVML's GPUs {uuids}")

    def _visible_indexes(self, count: int) -> list[int]:
        """The NVML indexes ``CUDA_VISIBLE_DEVICES`` names (indexes or UUIDs), else all."""
        setting = os.environ.get("CUDA_VISIBLE_DEVICES")
        if setting is None:
            return list(range(count))
        nv = self._nv
        uuids = []
        for index in range(count):
            uuid = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(index))
            uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        chosen: list[int] = []
        for token in (t.strip() for t in setting.split(",")):
            found = (
                [int(token)]
                if token.isdigit() and int(token) < count
                else [
                    i
                    for i, u in enumerate(uuids)
                    if token.startswith("GPU-") and u.startswith(token)
                ]
            )
            if len(found) != 1 or found[0] in chosen:
                break  # like CUDA: the list ends at the first entry that names no GPU
            chosen.extend(found)
        return chosen

    def memory_of(self, index: int) -> Memory:
        """Total, used and free memory of NVML GPU ``index`` now."""
        info = self._nv.nvmlDeviceGetMemoryInfo(self._nv.nvmlDeviceGetHandleByIndex(index))
        return Memory(info.total / _MIB, info.used / _MIB, info.free / _MIB)

    def _refuse_mig(self, index: int | None) -> None:
        """Raise :class:`MigEnabled` when GPU ``index`` (None: any) is in MIG mode."""
        nv = self._nv
        indexes = range(nv.nvmlDeviceGetCount()) if index is None else [index]
        for i in indexes:
            try:
                current = nv.nvmlDeviceGetMigMode(nv.nvmlDeviceGetHandleByIndex(i))[0]
            except (nv.NVMLError, AttributeError):
                continue  # no MIG support (not an A100/H100-class GPU), or an old pynvml
            if current == 1:
                raise MigEnabled(
                    f"MIG is enabled on NVML GPU {i}: CUDA sees a slice while NVML's memory and "
                    f"process figures are for the whole GPU, so this check cannot judge "
                    f"placement. Refusing: run it on a GPU with MIG disabled "
                    f"(nvidia-smi -i {i} -mig 0, as root, with the GPU idle)"
                )

    def memory(self) -> Memory:
        """Total, used and free memory of the GPU now."""
        info = self._nv.nvmlDeviceGetMemoryInfo(self._handle)
        return Memory(info.total / _MIB, info.used / _MIB, info.free / _MIB)

    def processes(self) -> dict[int, float]:
        """MiB used per compute process on the GPU (NVML's pids: the host's PID namespace)."""
        try:
            running = self._nv.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nv.NVMLError as exc:
            if not self._process_error_shown:
                detail(f"NVML cannot list processes: {exc}")
                self._process_error_shown = True
            return {}
        return {p.pid: (p.usedGpuMemory or 0) / _MIB for p in running}

    def close(self) -> None:
        """Shut NVML down (best effort)."""
        try:
            self._nv.nvmlShutdown()
        except self._nv.NVMLError:
            pass


def show_nvml(nvml: Nvml, label: str) -> Memory:
    """Print the GPU's memory and every compute process NVML lists; return the memory."""
    memory = nvml.memory()
    detail(f"NVML {label}: {memory}")
    processes = nvml.processes()
    for pid, used in sorted(processes.items()):
        detail(f"    pid {pid:>7}  {used:>9.0f} MiB  {describe_process(pid)}")
    if not processes:
        detail("    (no compute processes)")
    return memory


class Sampler(threading.Thread):
    """Samples NVML every ``period`` seconds, to show how memory is released over time."""

    def __init__(self, nvml: Nvml, period: float = 0.1) -> None:
        super().__init__(name="nvml-sampler", daemon=True)
        self._nvml = nvml
        self._period = period
        self._stop_event = threading.Event()
        #: (time, memory, pid -> MiB) per sample
        self.samples: list[tuple[float, Memory, dict[int, float]]] = []

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.monotonic(), self._nvml.memory(), self._nvml.processes()))
            except Exception:  # noqa: BLE001 - a failed sample must not end the check
                pass
            self._stop_event.wait(self._period)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join(timeout=5)

    def timeline(self, since: float, names: dict[int, str]) -> Iterator[str]:
        """One line per change that matters: used memory moved by 256 MiB, or a process came
        or went (named through ``names``, pid -> model)."""
        last: tuple[Memory, frozenset[int]] | None = None
        for moment, memory, processes in self.samples:
            pids = frozenset(processes)
            if last is not None and abs(memory.used_mb - last[0].used_mb) < 256 and pids == last[1]:
                continue
            change = ""
            if last is not None:
                gone = ", ".join(names.get(p, str(p)) for p in sorted(last[1] - pids))
                came = ", ".join(names.get(p, str(p)) for p in sorted(pids - last[1]))
                change = (f"  gone: {gone}" if gone else "") + (f"  new: {came}" if came else "")
            yield (
                f"t={moment - since:+6.2f}s  used {memory.used_mb:>8.0f} MiB  "
                f"free {memory.free_mb:>8.0f} MiB  processes {len(pids)}{change}"
            )
            last = (memory, pids)


def started_after_release(
    samples: list[tuple[float, Memory, dict[int, float]]], fallback_mb: float
) -> tuple[bool, str]:
    """Whether the first new process came only once the leaving one's memory showed free.

    Pids are not compared with swapper's: seen from a container NVML gives host PIDs. The
    leaving process is the one of the first sample that disappears; the new one is the first
    pid no earlier sample had. "Free" means NVML's used memory, less what new processes hold,
    fell by at least 3/4 of what the leaving one held (``fallback_mb`` where NVML gave no
    figure). Returns the verdict and a line saying why.
    """
    if not samples:
        return False, "no NVML sample was taken"
    first_moment, first_memory, first = samples[0]
    if not first:
        return False, "NVML lists no compute process: the timeline cannot tell them apart"
    leaving = next((pid for _, _, procs in samples for pid in first if pid not in procs), None)
    if leaving is None:
        return False, "no process of the first sample went away"
    held = first.get(leaving) or fallback_mb
    gone_at = freed_at = new_at = None
    for moment, memory, procs in samples:
        new = {pid: mb for pid, mb in procs.items() if pid not in first}
        if gone_at is None and leaving not in procs:
            gone_at = moment
        if (
            freed_at is None
            and memory.used_mb - sum(new.values()) <= first_memory.used_mb - 0.75 * held
        ):
            freed_at = moment
        if new_at is None and new:
            new_at = moment
            if freed_at is None:
                return False, (
                    f"a new process (pid {min(new)}) appeared at "
                    f"t={moment - first_moment:+.2f}s, before {held:.0f} MiB of "
                    f"pid {leaving} showed free"
                )
    if new_at is None or freed_at is None:
        return False, f"no new process appeared (freed at: {freed_at}, new at: {new_at})"
    lag = "" if gone_at is None else f"; freed {freed_at - gone_at:.2f}s after it left the list"
    return True, (
        f"pid {leaving}'s {held:.0f} MiB showed free at t={freed_at - first_moment:+.2f}s"
        f", the new process appeared at t={new_at - first_moment:+.2f}s{lag}"
    )


# --- processes ------------------------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    """A process's argv from /proc; empty when gone, a zombie, or not ours to see."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def describe_process(pid: int) -> str:
    """What a pid NVML lists is: a holder's served name, else its command line."""
    argv = cmdline(pid)
    if not argv:
        return "(not visible here: another PID namespace, or gone)"
    if any(arg.endswith("vram_holder.py") for arg in argv):
        flag = "--served-model-name"
        return f"vram_holder serving {argv[argv.index(flag) + 1] if flag in argv[:-1] else '?'}"
    return " ".join(argv)[:100]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def holder_pids() -> list[int]:
    """Live processes running this repository's vram_holder.py."""
    found = []
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and int(entry.name) != os.getpid()
            and str(HOLDER) in cmdline(int(entry.name))
            and alive(int(entry.name))
        ):
            found.append(int(entry.name))
    return sorted(found)


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, period: float = 0.2) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(period)


# --- swapper --------------------------------------------------------------------------------

# Loopback only: a proxy from the environment must never see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: Every swapper started, so the last cleanup can kill one that a timeout left running.
_STARTED: list[subprocess.Popen[bytes]] = []


class Swapper:
    """One ``python -m swapper serve`` subprocess and its admin API."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start swapper and wait until ``/health`` answers; RuntimeError if it does not."""
        self.port = free_port()
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            SWAPPER_LOG_LEVEL=os.environ.get("SWAPPER_LOG_LEVEL", "INFO"),
        )
        # The holder's shebang is `env python3`: let it find this interpreter first.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        with open(self.log_path, "ab") as log:
            # A session of its own: a final killpg reaches swapper, never this script.
            self.proc = subprocess.Popen(
                [*SWAPPER_COMMAND, "serve", "--config", str(self.config), "--port", str(self.port)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc
        _STARTED.append(proc)
        if not wait_until(
            lambda: proc.poll() is not None or self.get("/health", 2)[0] == 200, timeout
        ):
            raise RuntimeError(f"swapper did not answer /health within {timeout:.0f}s")
        if proc.poll() is not None:
            raise RuntimeError(
                f"swapper exited with status {proc.returncode}:\n"
                + "\n".join(tail(self.log_path, 15))
            )
        detail(f"swapper pid {proc.pid} on 127.0.0.1:{self.port}, log {self.log_path}")

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` (it stops its backends first), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                detail(f"swapper did not stop within {timeout:.0f}s: SIGKILL")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.wait(10)

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or text); status 0 when nothing answered."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        """GET ``path``."""
        return self.request("GET", path, timeout=timeout)

    def status(self) -> dict[str, Any]:
        """``/status``, or an empty document when it does not answer."""
        code, doc = self.get("/status")
        return doc if code == 200 and isinstance(doc, dict) else {}


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log file."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def model_states(doc: dict[str, Any], ids: tuple[str, ...] = MODELS) -> dict[str, str]:
    """Model id -> status (upper case) from a ``/status`` document."""
    models = doc.get("models") or {}
    return {mid: str((models.get(mid) or {}).get("status", "?")).upper() for mid in ids}


def model_pid(doc: dict[str, Any], model_id: str) -> int | None:
    """The pid ``/status`` gives for a model, if any."""
    pid = ((doc.get("models") or {}).get(model_id) or {}).get("pid")
    return pid if isinstance(pid, int) else None


def show_status(doc: dict[str, Any], nvml: Nvml) -> None:
    """Per model: status, pid, swapper's VRAM figures, and NVML's figure for that pid."""
    if not doc:
        detail("/status: no answer")
        return
    detail(f"/status: mode {doc.get('mode')}")
    processes = nvml.processes()
    for model_id in MODELS:
        model = (doc.get("models") or {}).get(model_id) or {}
        pid = model.get("pid")
        vram = {k: v for k, v in model.items() if "vram" in k.lower()}
        nvml_mb = f"{processes[pid]:.0f} MiB" if pid in processes else "-"
        detail(
            f"    {model_id}: {model.get('status')!s:<9} pid {pid!s:>7}  "
            f"{json.dumps(vram)}  NVML for pid: {nvml_mb}"
        )
    extra = {
        k: v
        for k, v in doc.items()
        if k not in ("models", "gpu", "mode") and ("vram" in k.lower() or "budget" in k.lower())
    }
    if extra:
        detail(f"    {json.dumps(extra)[:300]}")
    for gpu in (doc.get("gpu") or {}).get("gpus", []):
        detail(
            f"    swapper's gpu[{gpu.get('index')}]: total {gpu.get('total_mb')} MiB, "
            f"used {gpu.get('used_mb')} MiB, free {gpu.get('free_mb')} MiB"
        )


def state_file_learned(state: Any) -> dict[str, float]:
    """Model id -> learned MiB from swapper's state file (``{"models": {id: {"vram_mb": ..}}}``)."""
    models = state.get("models") if isinstance(state, dict) else None
    found: dict[str, float] = {}
    for model_id, entry in (models or {}).items():
        value = entry.get("vram_mb") if isinstance(entry, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found[model_id] = float(value)
    return found


def status_learned(doc: dict[str, Any]) -> dict[str, float]:
    """Model id -> learned MiB from ``/status``'s ``vram.learned_mb`` (measured, not configured:
    ``predicted_vram_mb`` equals the configured ``vram_mb`` before any measurement)."""
    learned = (doc.get("vram") or {}).get("learned_mb") if isinstance(doc, dict) else None
    return {
        model_id: float(value)
        for model_id, value in (learned or {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    }


# --- the check ------------------------------------------------------------------------------


def to_yaml(doc: dict[str, Any], indent: int = 0) -> str:
    """Nested dicts of scalars as block YAML (scalars JSON-encoded, which YAML reads)."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"{' ' * indent}{key}:")
            lines.append(to_yaml(value, indent + 2))
        else:
            lines.append(f"{' ' * indent}{key}: {json.dumps(value)}")
    return "\n".join(lines)


def write_config(
    workdir: Path,
    total_mb: float,
    fraction: float,
    budget_fraction: float,
    gpu: int | None,
    model_ids: tuple[str, ...] = MODELS,
    name: str = "swapper.yaml",
) -> Path:
    """swapper's config: multi-active, holders of ``fraction`` x total VRAM each, on NVML GPU
    ``gpu`` (None: ``auto``)."""
    models = {
        model_id: {
            "backend": "vllm",
            "model": f"holder-{model_id}",
            "binary": str(HOLDER),
            "gpu_memory_utilization": fraction,
            "vram_mb": round(fraction * total_mb),
            **({} if gpu is None else {"gpus": [gpu]}),
        }
        for model_id in model_ids
    }
    config = {
        "swapper": {
            "mode": "multi-active",
            "max_concurrent_models": 3,  # the count never binds: only the VRAM budget does
            # Per GPU: on each GPU, models may use this much together.
            "vram_budget_mb": round(budget_fraction * total_mb),
            "vram_reserve_mb": 512,
            "vram_release_timeout": 10,
            "model_swap_timeout": 120,
            "stop_timeout": 10,
            "shutdown_timeout": 5,
            "gpu_enabled": True,
            "state_file": str(workdir / "state.json"),
        },
        "server": {"host": "127.0.0.1"},
        "models": models,
    }
    path = workdir / name
    path.write_text(to_yaml(config) + "\n")
    return path


class CheckTimeout(Exception):
    """The whole check ran past ``--time-limit``."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise CheckTimeout()


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the children


def run(
    args: argparse.Namespace, nvml: Nvml, workdir: Path, checks: dict[str, bool | None]
) -> None:
    """Steps 1-6; fills ``checks`` as it goes (a step not reached leaves its checks None)."""
    step(f"1. baseline: GPU {nvml.index} {nvml.name}, driver {nvml.driver}")
    detail(f"{nvml.mapping}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}")
    baseline = show_nvml(nvml, "baseline")
    total = baseline.total_mb
    each = args.fraction * total
    budget = args.budget_fraction * total
    detail(
        f"plan: each holder takes {args.fraction:g} x total = {each:.0f} MiB (+ its CUDA "
        f"context); budget {budget:.0f} MiB: two fit, three do not"
    )
    detail(
        f"      with a and b resident ~{baseline.free_mb - 2 * each:.0f} MiB stays free, "
        f"less than c asks for: c can start only once b's memory is released"
    )
    if baseline.free_mb < 2 * each + 2048:
        raise RuntimeError(
            f"the GPU is not free enough: {baseline.free_mb:.0f} MiB free, "
            f"{2 * each + 2048:.0f} MiB needed"
        )

    config = write_config(workdir, total, args.fraction, args.budget_fraction, nvml.index)
    detail(f"config {config}:")
    for line in config.read_text().splitlines():
        detail(f"    {line}")
    checked = subprocess.run(
        [*SWAPPER_COMMAND, "check-config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if checked.returncode != 0:
        raise RuntimeError(
            "swapper refuses the config: " + (checked.stderr or checked.stdout).strip()
        )

    swapper = Swapper(config, workdir / "swapper-1.log")
    logs = [swapper.log_path]
    try:
        swapper.start()

        step("2. load a, then b (both fit under the budget)")
        for model_id in ("a", "b"):
            began = time.monotonic()
            code, body = swapper.request("POST", f"/models/{model_id}/load", timeout=150)
            detail(
                f"POST /models/{model_id}/load -> {code} in {time.monotonic() - began:.1f}s"
                + ("" if code == 200 else f": {json.dumps(body)[:400]}")
            )
        doc = swapper.status()
        show_status(doc, nvml)
        show_nvml(nvml, "with a and b")
        states = model_states(doc)
        checks["a and b resident together"] = states["a"] == states["b"] == "LOADED"
        pids = {model_id: model_pid(doc, model_id) for model_id in MODELS}

        step("3. chat to a (b becomes least recently used), then load c")
        code, body = swapper.request(
            "POST",
            "/v1/chat/completions",
            {
                "model": "a",
                "messages": [{"role": "user", "content": "who holds the memory?"}],
                "max_tokens": 16,
            },
            timeout=30,
        )
        reply = (
            body.get("choices", [{}])[0].get("message", {}).get("content")
            if isinstance(body, dict) and body.get("choices")
            else body
        )
        detail(f"chat to a -> {code}: {reply!r}")
        sampler = Sampler(nvml)
        sampler.start()
        began = time.monotonic()
        try:
            code, body = swapper.request("POST", "/models/c/load", timeout=150)
            loaded_in = time.monotonic() - began
            time.sleep(0.5)  # a few samples after the load, so the timeline ends settled
        finally:
            sampler.stop()
        detail(
            f"POST /models/c/load -> {code} in {loaded_in:.1f}s"
            + ("" if code == 200 else f": {json.dumps(body)[:600]}")
        )
        waited, why = started_after_release(sampler.samples, each)
        checks["c started only after b's memory showed free (NVML timeline)"] = waited
        detail(f"release order: {why}")
        doc = swapper.status()
        pids["c"] = model_pid(doc, "c")
        names = {pid: f"holder-{mid}" for mid, pid in pids.items() if pid is not None}
        detail("NVML every 0.1 s while c loaded (t=0: the load request):")
        for line in sampler.timeline(began, names):
            detail(f"    {line}")
        show_status(doc, nvml)
        show_nvml(nvml, "with a and c")
        states = model_states(doc)
        checks["b evicted (least recently used) to fit c, a kept"] = (
            states["b"] == "UNLOADED" and states["a"] == "LOADED"
        )
        checks["c resident"] = states["c"] == "LOADED"
        b_pid = pids["b"]
        checks["b's process gone"] = (
            b_pid is not None and not alive(b_pid) and b_pid not in nvml.processes()
        )
        detail(f"b's process {b_pid}: {'still running' if b_pid and alive(b_pid) else 'gone'}")

        step("4. swapper's log: waiting for GPU memory, eviction")
        lines = [line for line in tail(swapper.log_path, 2000) if _LOG_PATTERN.search(line)]
        for line in lines[-40:]:
            detail(line)
        if not lines:
            detail("(no matching line)")

        step("5. restart swapper: learned VRAM sizes survive")
        code = swapper.stop()
        detail(f"swapper stopped, exit status {code}")
        state_file = workdir / "state.json"
        swapper = Swapper(config, workdir / "swapper-2.log")
        logs.append(swapper.log_path)
        swapper.start()
        doc = swapper.status()
        show_status(doc, nvml)
        state: Any = None
        if state_file.exists():
            text = state_file.read_text(errors="replace")
            detail(f"state file {state_file} ({len(text)} bytes):")
            for line in text[:3000].splitlines():
                detail(f"    {line}")
            try:
                state = json.loads(text)
            except ValueError as exc:
                detail(f"not JSON: {exc}")
        else:
            detail(f"state file {state_file} does not exist")
        from_status = status_learned(doc)
        from_file = state_file_learned(state)
        detail(
            f"learned sizes (MiB): /status vram.learned_mb {json.dumps(from_status)}, "
            f"state file {json.dumps(from_file)}"
        )
        checks["learned VRAM sizes recorded"] = all(
            m in from_status and m in from_file for m in MODELS
        )
        for line in tail(swapper.log_path, 500):
            if _LOG_PATTERN.search(line):
                detail(line)
    finally:
        step("6. stop swapper")
        code = swapper.stop()
        detail(f"swapper stopped, exit status {code}")
        wait_until(lambda: not holder_pids(), 15)  # swapper reaps them; allow for stragglers
        leftover = holder_pids()
        checks["no stray holder processes"] = not leftover
        detail(f"holder processes left: {leftover or 'none'}")
        back = wait_until(
            lambda: nvml.memory().used_mb <= baseline.used_mb + _BASELINE_SLACK_MB, 20, period=0.25
        )
        checks["NVML used memory back near baseline"] = back
        after = show_nvml(nvml, "after stop")
        detail(
            f"used {after.used_mb:.0f} MiB vs baseline {baseline.used_mb:.0f} MiB "
            f"(slack {_BASELINE_SLACK_MB:.0f})"
        )
        if args.verbose:
            for path in logs:
                step(f"full log {path}")
                for line in tail(path, 400):
                    detail(line)


def run_two_gpus(
    args: argparse.Namespace, nvml: Nvml, workdir: Path, checks: dict[str, bool | None]
) -> None:
    """Step 7: two holders, ``auto``, on a machine with two GPUs or more; fills TWO_GPU_CHECK."""
    gpus = nvml.visible
    step(f"7. two GPUs ({', '.join(f'NVML {i}' for i in gpus)}): two holders, gpus: auto")
    before = {i: nvml.memory_of(i) for i in gpus}
    for index, memory in before.items():
        detail(f"NVML GPU {index} before: {memory}")
    total = min(m.total_mb for m in before.values())
    each = args.two_gpu_fraction * total
    detail(
        f"plan: each holder takes {args.two_gpu_fraction:g} x {total:.0f} MiB = {each:.0f} MiB; "
        f"budget {args.budget_fraction:g} x total per GPU: two cannot share one GPU"
    )
    roomy = [i for i, m in before.items() if m.free_mb >= each + 2048]
    if len(roomy) < 2:
        raise RuntimeError(f"fewer than two GPUs have {each + 2048:.0f} MiB free: {roomy}")
    config = write_config(
        workdir,
        total,
        args.two_gpu_fraction,
        args.budget_fraction,
        None,
        ("d", "e"),
        "swapper-two-gpus.yaml",
    )
    swapper = Swapper(config, workdir / "swapper-3.log")
    try:
        swapper.start()
        for model_id in ("d", "e"):
            began = time.monotonic()
            code, body = swapper.request("POST", f"/models/{model_id}/load", timeout=150)
            detail(
                f"POST /models/{model_id}/load -> {code} in {time.monotonic() - began:.1f}s"
                + ("" if code == 200 else f": {json.dumps(body)[:400]}")
            )
        doc = swapper.status()
        states = model_states(doc, ("d", "e"))
        detail(f"/status: {states}")
        after = {i: nvml.memory_of(i) for i in gpus}
        grown = {i: after[i].used_mb - before[i].used_mb for i in gpus}
        for index in gpus:
            detail(f"NVML GPU {index} with d and e: {after[index]} (grew {grown[index]:.0f} MiB)")
        holding = [i for i in gpus if grown[i] >= 0.9 * each]
        detail(f"GPUs that grew by about a holder's share: {holding}")
        checks[TWO_GPU_CHECK] = states.get("d") == states.get("e") == "LOADED" and len(holding) >= 2
    finally:
        code = swapper.stop()
        detail(f"swapper stopped, exit status {code}")
        wait_until(lambda: not holder_pids(), 15)
        leftover = holder_pids()
        checks["no stray holder processes"] = bool(checks["no stray holder processes"]) and not (
            leftover
        )
        detail(f"holder processes left: {leftover or 'none'}")


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every check passes, 1 otherwise (or without a GPU)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.4,
        help="share of total VRAM each holder takes (default %(default)s)",
    )
    parser.add_argument(
        "--budget-fraction",
        type=float,
        default=0.9,
        help="swapper.vram_budget_mb as a share of total (default %(default)s)",
    )
    parser.add_argument(
        "--two-gpu-fraction",
        type=float,
        default=0.6,
        help="share of a GPU each of step 7's two holders takes (default %(default)s)",
    )
    parser.add_argument(
        "--time-limit",
        type=int,
        default=210,
        help="seconds the whole check may take (default %(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="print swapper's full logs")
    args = parser.parse_args(argv)
    # Two holders (plus their CUDA contexts) must fit the budget, three must not, and with two
    # resident the GPU must be too full for the third: that is what makes the wait matter.
    if not (
        2 * args.fraction < args.budget_fraction - 0.02 < 3 * args.fraction
        and 3 * args.fraction > 1.0
        and args.budget_fraction <= 1.0
    ):
        parser.error("need 2 x fraction < budget-fraction < 3 x fraction, 3 x fraction > 1")
    if not args.budget_fraction / 2 < args.two_gpu_fraction <= args.budget_fraction - 0.02:
        parser.error("need budget-fraction / 2 < two-gpu-fraction < budget-fraction")

    try:
        nvml = Nvml()
    except MigEnabled as exc:
        print(f"refused: {exc}", flush=True)
        return 1
    except NoGpu as exc:
        print(f"no NVIDIA GPU/driver: {exc}", flush=True)
        return 1
    if not HOLDER.exists():
        print(f"missing {HOLDER}", flush=True)
        return 1
    if not os.access(HOLDER, os.X_OK):  # swapper runs it as the backend's binary
        try:
            HOLDER.chmod(HOLDER.stat().st_mode | 0o111)
        except OSError as exc:
            print(f"{HOLDER} is not executable and cannot be made so: {exc}", flush=True)
            return 1

    checks: dict[str, bool | None] = dict.fromkeys(CHECK_NAMES)  # None: not reached
    two_gpus = len(nvml.visible) >= 2
    if two_gpus:
        checks[TWO_GPU_CHECK] = None
    workdir = Path(tempfile.mkdtemp(prefix="swapper-gpu-check-"))
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(args.time_limit)
    error = ""
    try:
        run(args, nvml, workdir, checks)
        if two_gpus:
            run_two_gpus(args, nvml, workdir, checks)
    except CheckTimeout:
        error = f"the check ran past its {args.time_limit}s limit"
    except KeyboardInterrupt:
        error = "interrupted"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        error = str(exc)
    finally:
        signal.alarm(0)
        # Whatever happened: neither swapper nor a holder of ours may outlive the check.
        for proc in _STARTED:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(10)
        for pid in holder_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        nvml.close()
        if args.keep:
            print(f"\nwork directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n=== summary (NVML GPU {nvml.index} {nvml.name}, {time.monotonic() - _START:.1f}s) ==="
    )
    if error:
        print(f"ERROR   {error}")
    for name, passed in checks.items():
        print(f"{'NOT RUN' if passed is None else 'PASS' if passed else 'FAIL':<8}{name}")
    ok = not error and all(passed is True for passed in checks.values())
    print("all checks passed" if ok else "GPU check FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
