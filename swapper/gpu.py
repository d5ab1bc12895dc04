"""Every NVML call swapper makes, in one place; no driver means "no GPU", never a crash.

NVML is initialised once, on first use. On a machine without an NVIDIA driver the monitor says
so once in the log and then reports ``available: false``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GpuMonitor", "GpuStats"]

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


class GpuMonitor:
    """Reads GPU memory through NVML (module ``pynvml`` of nvidia-ml-py)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._ready: bool | None = None  # None: not tried yet
        self._foreign_pids_logged = False

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
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                stats.append(GpuStats(index, name.decode() if isinstance(name, bytes) else name,
                                      memory.total / _MB, memory.used / _MB, memory.free / _MB))
            return stats
        except nvml.NVMLError as exc:
            logger.warning("NVML read failed: %s", exc)
            return []

    def totals_mb(self) -> tuple[float, float, float] | None:
        """Total, used and free MiB over every GPU; None without NVML."""
        gpus = self.gpus()
        if not gpus:
            return None
        return (sum(g.total_mb for g in gpus), sum(g.used_mb for g in gpus),
                sum(g.free_mb for g in gpus))

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
            for index in range(nvml.nvmlDeviceGetCount()):
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
                logger.warning("NVML reports no process of ours: in a container without "
                               "`pid: host`? Per-process GPU memory is unknown; sizes come "
                               "from the change in used memory instead")
            return None
        return used / _MB

    def snapshot(self) -> dict[str, Any]:
        """The ``gpu`` section of ``/status``."""
        gpus = self.gpus()
        return {"available": bool(gpus),
                "gpus": [{"index": g.index, "name": g.name, "total_mb": round(g.total_mb),
                          "used_mb": round(g.used_mb), "free_mb": round(g.free_mb)}
                         for g in gpus]}


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
