"""Every NVML call swapper makes, in one place; no driver means "no GPU", never a crash.

NVML is initialised once, on first use. On a machine without an NVIDIA driver the monitor says
so once in the log and then reports ``available: false``. NVML lists every GPU of the machine;
when ``CUDA_VISIBLE_DEVICES`` is set, only the GPUs it names (by index or UUID) count, since
the backends cannot use the others.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GpuMonitor", "GpuStats", "parse_visible_devices"]

logger = logging.getLogger("swapper.gpu")

_MB = 1024 * 1024


@dataclass(frozen=True)
class GpuStats:
    """One GPU's memory, in MiB."""

    index: int
    name: str
    total_mb: float
    used_mb: float
    free_mb: float
    #: NVML's ``GPU-...`` UUID ("" when unknown).
    uuid: str = ""


class GpuMonitor:
    """Reads GPU memory through NVML (module ``pynvml`` of nvidia-ml-py)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._ready: bool | None = None  # None: not tried yet
        self._foreign_pids_logged = False
        self._visible_logged: str | None = None

    def _init(self) -> bool:
        if self._ready is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._ready = True
                logger.info("NVML: %d GPU(s)", pynvml.nvmlDeviceGetCount())
            except Exception as exc:  # noqa: BLE001 - missing library/driver: "no GPU", not a crash
                self._ready = False
                logger.info("no GPU: NVML unavailable (%s)", type(exc).__name__)
        return self._ready

    @property
    def available(self) -> bool:
        """True when NVML answered."""
        return self._init()

    def gpus(self) -> list[GpuStats]:
        """Memory of every GPU; empty without NVML or when a read fails."""
        if not self._init():
            return []
        nvml = self._nvml
        try:
            stats = []
            for index in self._indexes():
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                stats.append(
                    GpuStats(
                        index,
                        name.decode() if isinstance(name, bytes) else name,
                        memory.total / _MB,
                        memory.used / _MB,
                        memory.free / _MB,
                        uuid.decode() if isinstance(uuid, bytes) else uuid,
                    )
                )
            return stats
        except nvml.NVMLError as exc:
            logger.warning("NVML read failed: %s", exc)
            return []

    def totals_mb(self) -> tuple[float, float, float] | None:
        """Total, used and free MiB over every GPU; None without NVML."""
        gpus = self.gpus()
        if not gpus:
            return None
        return (
            sum(g.total_mb for g in gpus),
            sum(g.used_mb for g in gpus),
            sum(g.free_mb for g in gpus),
        )

    def used_mb(self) -> float | None:
        """MiB used over every GPU now; None without NVML.

        The fallback measurement where :meth:`process_memory_mb` cannot tell: the change in
        this figure across a load (or a sleep) is what that model took (or gave back).
        """
        totals = self.totals_mb()
        return None if totals is None else totals[1]

    def process_memory_mb(self, pid: int) -> float | None:
        """GPU memory held by ``pid`` and its descendants; None when unknown.

        Unknown: no GPU, a failed read, or NVML lists compute processes of which none is ours.
        The driver reports host PIDs and knows nothing of PID namespaces, so in a container
        without ``pid: host`` no listed pid matches ours; 0 would then be a wrong answer.
        """
        if not self._init():
            return None
        nvml = self._nvml
        pids = _process_tree(pid)
        used = 0
        listed = matched = 0
        try:
            for index in self._indexes():
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    listed += 1
                    if process.pid in pids:
                        matched += 1
                        if process.usedGpuMemory is not None:
                            used += process.usedGpuMemory
        except nvml.NVMLError as exc:
            logger.warning("NVML read failed: %s", exc)
            return None
        if listed and not matched:
            if not self._foreign_pids_logged:
                self._foreign_pids_logged = True
                logger.warning(
                    "NVML reports no process of ours: in a container without "
                    "`pid: host`? Per-process GPU memory is unknown; sizes come "
                    "from the change in used memory instead"
                )
            return None
        return used / _MB

    def _indexes(self) -> list[int]:
        """NVML indexes of the GPUs CUDA may use: those ``CUDA_VISIBLE_DEVICES`` names, else all.

        Like CUDA, the list ends at the first entry that names no GPU (``-1`` hides them all).
        An index is NVML's, which is CUDA's only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; UUIDs
        (or their unique prefixes) are unambiguous. May raise ``NVMLError``.
        """
        nvml = self._nvml
        count = nvml.nvmlDeviceGetCount()
        setting = os.environ.get("CUDA_VISIBLE_DEVICES")
        if setting is None:
            return list(range(count))
        uuids: list[str] = []
        for index in range(count):
            uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index))
            uuids.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
        chosen = parse_visible_devices(setting, uuids)
        if self._visible_logged != setting:
            self._visible_logged = setting
            logger.info(
                "CUDA_VISIBLE_DEVICES=%r: counting NVML GPU(s) %s of %d",
                setting,
                chosen or "none",
                count,
            )
        return chosen


def parse_visible_devices(setting: str, uuids: list[str]) -> list[int]:
    """The NVML indexes a ``CUDA_VISIBLE_DEVICES`` value names, given every GPU's UUID.

    Like CUDA, the list ends at the first entry that names no GPU (``-1`` hides them all).
    Tokens are indexes (NVML's, which is CUDA's under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) or
    UUIDs, whole or as a unique ``GPU-`` prefix.
    """
    count = len(uuids)
    chosen: list[int] = []
    for token in (t.strip() for t in setting.split(",")):
        if token.isdigit() and int(token) < count:
            found = [int(token)]
        else:
            found = [
                i
                for i, u in enumerate(uuids)
                if token and (u == token or (u.startswith(token) and token.startswith("GPU-")))
            ]
        if len(found) != 1 or found[0] in chosen:
            break
        chosen.extend(found)
    return chosen


def _process_tree(root: int) -> set[int]:
    """``root`` and every process descended from it (Linux /proc; just ``root`` elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return {root}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in tree:
            tree.add(pid)
            stack.extend(children.get(pid, []))
    return tree
