"""The wait before a load for memory NVML has not shown free yet, GPU by GPU.

CUDA's free figure lags an unload by 0.5-1.5 s, and vLLM refuses to start while free memory is
below what it reserves. So when a model stops (or sleeps), placement notes on each of its GPUs
the used figure NVML must fall to; a load onto one of those GPUs waits for it, and for the
memory it needs free there. A release on GPU 1 never holds up a load on GPU 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swapper.scheduling.placement import Placement
    from swapper.scheduling.runtime import ModelRuntime

__all__ = ["ReleaseWatch"]

logger = logging.getLogger("swapper.placement")

#: Share of a freed model's memory NVML must show back before the next load (as Ollama does).
_RELEASE_SHARE = 0.75
_POLL = 0.1


@dataclass
class _Release:
    """NVML must show GPU ``device``'s used memory at or below ``used_mb`` before a load there."""

    model_id: str
    device: int
    used_mb: float
    deadline: float


class ReleaseWatch:
    """Releases NVML has yet to show, by GPU, and the bounded wait for them."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self._releases: list[_Release] = []

    def expect(
        self, model: ModelRuntime, used_before: dict[int, float] | None, freed_mb: float
    ) -> None:
        """``model`` gave back ``freed_mb`` (split evenly over its GPUs); NVML read
        ``used_before`` on each GPU just before."""
        gpus = model.gpus
        if used_before is None or freed_mb <= 0 or not gpus:
            return
        deadline = time.monotonic() + self.placement.config.swapper.vram_release_timeout
        share = _RELEASE_SHARE * freed_mb / len(gpus)
        for index in gpus:
            if index in used_before:
                self._releases.append(
                    _Release(model.id, index, used_before[index] - share, deadline)
                )

    def pending(self, device: int) -> list[str]:
        """The models whose release on GPU ``device`` NVML has yet to show (expired or not)."""
        return [r.model_id for r in self._releases if r.device == device]

    async def wait(self, model: ModelRuntime, need_mb: float) -> None:
        """Wait until the releases on ``model``'s GPUs are seen and ``need_mb`` (split evenly)
        is free there. Bounded by ``swapper.vram_release_timeout``; logged."""
        placement = self.placement
        devices = model.gpus
        if placement.gpu is None or placement.total_mb is None or not devices:
            return
        settings = placement.config.swapper
        share = need_mb / len(devices)
        started = time.monotonic()
        timeout = settings.vram_release_timeout
        deadline = started + timeout
        announced = False
        while True:
            now = time.monotonic()
            stats = await placement.read_gpus()
            if not stats:
                return
            # Expired, or seen through: memory used again later is another matter.
            self._releases = [
                r
                for r in self._releases
                if r.deadline > now
                and (r.device not in stats or stats[r.device].used_mb > r.used_mb)
            ]
            pending = [r for r in self._releases if r.device in devices]
            short = [
                g
                for g in devices
                if g in stats
                and share > 0
                and stats[g].free_mb
                < min(share, max(0.0, stats[g].total_mb - settings.reserve_for(g)))
            ]
            free = ", ".join(f"GPU {g}: {stats[g].free_mb:.0f}" for g in devices if g in stats)
            if not pending and not short:
                waited = now - started
                if waited >= _POLL:
                    logger.info(
                        "%s: waited %.2fs for GPU memory to be released (%s MiB free)",
                        model.id,
                        waited,
                        free,
                    )
                return
            why = (
                f"still waiting for {', '.join(sorted({r.model_id for r in pending}))} to release"
                if pending
                else f"{free} MiB free, {share:.0f} MiB wanted on each of GPU(s) {list(devices)}"
            )
            if not announced:
                announced = True
                logger.info("%s: waiting up to %gs for free VRAM (%s)", model.id, timeout, why)
            if now >= deadline:
                logger.warning(
                    "%s: gave up waiting %.1fs for GPU memory (%s); starting anyway",
                    model.id,
                    now - started,
                    why,
                )
                # The releases stay: they expire at their own deadlines, and another load onto
                # one of those GPUs must not take this model's giving up for NVML's all-clear.
                return
            await asyncio.sleep(_POLL)
