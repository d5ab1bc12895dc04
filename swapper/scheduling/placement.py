"""Where models fit: VRAM accounting, eviction choice and the learned sizes kept across restarts.

The coordinator asks :meth:`Placement.plan` whether a model can load now, and if not which
resident models should make room. A model's size is, in order of trust: what swapper measured
the last time it was resident (kept in the state file), its configured ``vram_mb``, the
backend's own estimate (vLLM reserves ``gpu_memory_utilization`` of the GPU), or unknown (0:
only ``max_concurrent_models`` then limits it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from swapper.config import Config, ModelEntry
from swapper.scheduling.model_state import ModelStatus

if TYPE_CHECKING:
    from swapper.scheduling.runtime import ModelRuntime

__all__ = [
    "EvictionChoice",
    "GpuView",
    "Placement",
    "Plan",
    "SizeBook",
    "default_state_file",
]

logger = logging.getLogger("swapper.placement")

_S = ModelStatus


#: Share of a freed model's memory NVML must show back before the next load (as Ollama does).
_RELEASE_SHARE = 0.75
_POLL = 0.1


class GpuView(Protocol):
    """What placement needs of :class:`swapper.gpu.GpuMonitor` (a fake GPU in tests)."""

    @property
    def available(self) -> bool: ...

    def totals_mb(self) -> tuple[float, float, float] | None: ...

    def process_memory_mb(self, pid: int) -> float | None: ...


def default_state_file() -> Path:
    """``$XDG_STATE_HOME/swapper/state.json``, else ``~/.local/state/swapper/state.json``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "swapper" / "state.json"


def fingerprint(entry: ModelEntry) -> str:
    """Changes whenever a model's entry does, so a size learned for another setup is not used."""
    return hashlib.sha256(msgspec.json.encode(entry)).hexdigest()[:16]


class SizeBook:
    """Measured VRAM sizes by model id, kept in a small JSON state file across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sizes: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(path.read_text())
            models = data.get("models", {}) if isinstance(data, dict) else {}
            self._sizes = {
                k: v
                for k, v in models.items()
                if isinstance(v, dict) and isinstance(v.get("vram_mb"), int | float)
            }
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a damaged file only loses what was learned
            logger.warning("ignoring the state file %s: %s", path, exc)

    def get(self, model_id: str, entry: ModelEntry) -> float | None:
        """The learned size of ``model_id`` in MiB, if learned for this very entry."""
        known = self._sizes.get(model_id)
        if known is None or known.get("fingerprint") != fingerprint(entry):
            return None
        return float(known["vram_mb"])

    def record(self, model_id: str, entry: ModelEntry, vram_mb: float) -> bool:
        """Remember a measurement; True when it changed what is known (then :meth:`save`)."""
        old = self.get(model_id, entry)
        if old is not None and abs(old - vram_mb) <= max(16.0, 0.02 * old):
            return False
        self._sizes[model_id] = {
            "vram_mb": round(vram_mb, 1),
            "fingerprint": fingerprint(entry),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return True

    def save(self) -> None:
        """Write the file atomically (a crash mid-write leaves the old one)."""
        document = json.dumps({"version": 1, "models": self._sizes}, indent=2, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
            with os.fdopen(fd, "w") as out:
                out.write(document)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not write the state file %s: %s", self.path, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)

    def snapshot(self) -> dict[str, float]:
        """Learned sizes by model id."""
        return {k: float(v["vram_mb"]) for k, v in self._sizes.items()}


@dataclass(frozen=True)
class EvictionChoice:
    """A model to move out: put to sleep, or stopped (``full``)."""

    model: ModelRuntime
    full: bool


@dataclass
class Plan:
    """What to do for one model that wants to load."""

    #: It fits now: start it.
    start: bool = False
    #: Models to move out first (it starts once they are out).
    evict: list[EvictionChoice] = field(default_factory=list)
    #: Why it can never fit; the requests for it get a 503.
    refuse: str | None = None


@dataclass
class _Release:
    """NVML must show ``used_mb`` at or below this before the next load."""

    model_id: str
    used_mb: float
    deadline: float


class Placement:
    """VRAM accounting for the coordinator: budget, sizes, eviction order, released memory."""

    def __init__(self, config: Config, gpu: GpuView | None) -> None:
        self.config = config
        self.gpu = gpu
        totals = gpu.totals_mb() if gpu is not None and gpu.available else None
        self.total_mb = totals[0] if totals else None
        state = config.swapper.state_file
        self.sizes = SizeBook(Path(state) if state else default_state_file())
        self._releases: list[_Release] = []
        #: Counts backend starts, stops, sleeps and wakes: a change in NVML's used memory across a
        #: span in which it moved by one only is that one model's doing (see :meth:`note_change`).
        self.gpu_changes = 0

    def note_change(self) -> int:
        """A backend is about to start, stop, sleep or wake; return the new count."""
        self.gpu_changes += 1
        return self.gpu_changes

    @property
    def budget_mb(self) -> float | None:
        """VRAM models may use together; None: unknown (no GPU, no configured budget)."""
        settings = self.config.swapper
        if settings.vram_budget_mb is not None:
            return settings.vram_budget_mb
        if self.total_mb is None:
            return None
        return max(0.0, self.total_mb - settings.vram_reserve_mb)

    # -- sizes ------------------------------------------------------------------------------

    def predicted_mb(self, model: ModelRuntime) -> float:
        """What ``model`` will take when loaded: learned, configured, estimated, else 0."""
        entry = model.backend.entry
        learned = self.sizes.get(model.id, entry)
        if learned is not None:
            return learned
        if entry.vram_mb is not None:
            return entry.vram_mb
        return model.backend.estimate_vram_mb(self.total_mb) or 0.0

    def start_need_mb(self, model: ModelRuntime) -> float:
        """Free memory ``model``'s backend needs to start: its predicted size, or more when the
        backend reserves a share of the GPU up front (vLLM refuses to start below
        ``gpu_memory_utilization`` × total, however small the model)."""
        reserved = model.backend.estimate_vram_mb(self.total_mb) or 0.0
        return max(self.predicted_mb(model), reserved)

    def pinned(self, model: ModelRuntime) -> bool:
        """Pinned models are evicted last; the default model is pinned unless configured."""
        entry = self.config.models.get(model.id)
        if entry is not None and entry.pinned is not None:
            return entry.pinned
        return model.id == self.config.swapper.default_model

    # -- planning ---------------------------------------------------------------------------

    def refusal(self, model: ModelRuntime) -> str | None:
        """Why ``model`` can never fit, or None."""
        budget = self.budget_mb
        need = self.predicted_mb(model)
        if budget is not None and need > budget:
            return (
                f"Model {model.id!r} needs about {need:.0f} MiB of VRAM, more than the "
                f"{budget:.0f} MiB budget; it can never be loaded (check its vram_mb and "
                f"swapper.vram_budget_mb)"
            )
        return None

    def plan(self, target: ModelRuntime, others: Iterable[ModelRuntime]) -> Plan:
        """Can ``target`` load now, and if not, which of ``others`` should make room?

        Models already on their way out count as gone (their end state: asleep or stopped);
        if that is enough, nothing more is evicted and the load waits for them.
        """
        refusal = self.refusal(target)
        if refusal is not None:
            return Plan(refuse=refusal)
        budget = self.budget_mb
        need = self.predicted_mb(target)
        slots = self.config.swapper.max_concurrent_models
        residents = [m for m in others if m is not target and m.holds_memory]

        def fits(slot_count: int, used: float) -> bool:
            return slot_count + 1 <= slots and (budget is None or used + need <= budget)

        now_slots = sum(m.holds_slot for m in residents)
        now_used = sum(m.charge_mb for m in residents)
        if fits(now_slots, now_used):
            return Plan(start=True)
        # What is left once the models already unloading are out.
        slots_left = sum(m.status in (_S.LOADING, _S.LOADED) for m in residents)
        used_left = sum(
            m.mb_after_unload if m.status == _S.UNLOADING else m.charge_mb for m in residents
        )
        plan = Plan()
        if fits(slots_left, used_left):
            return plan
        candidates = [m for m in residents if m.status in (_S.SLEEPING, _S.LOADED)]
        # Models already draining (an operator's unload, a ttl) are leaving anyway: first.
        candidates.sort(
            key=lambda m: (
                not m.draining,
                self.pinned(m),
                m.status == _S.LOADED,
                m.in_flight > 0 or m.queued > 0,
                m.last_used or m.loaded_at or 0.0,
            )
        )
        for model in candidates:
            slot_short = slots_left + 1 > slots
            memory_short = budget is not None and used_left + need > budget
            if not (slot_short or memory_short):
                break
            if model.status == _S.SLEEPING:
                if memory_short:
                    plan.evict.append(EvictionChoice(model, full=True))
                    used_left -= model.charge_mb
                continue
            slots_left -= 1
            charge = model.charge_mb
            if model.backend.can_sleep and not model.must_stop:
                asleep = model.sleep_mb
                if budget is None or used_left - charge + asleep + need <= budget:
                    plan.evict.append(EvictionChoice(model, full=False))
                    used_left += asleep - charge
                    continue
            plan.evict.append(EvictionChoice(model, full=True))
            used_left -= charge
        return plan

    # -- released memory ----------------------------------------------------------------------

    async def used_mb(self) -> float | None:
        """NVML's used figure, read off the event loop (None without a GPU)."""
        if self.gpu is None or self.total_mb is None:
            return None
        totals = await asyncio.to_thread(self.gpu.totals_mb)
        return totals[1] if totals else None

    async def process_mb(self, pid: int | None) -> float | None:
        """What ``pid``'s process tree holds on the GPU, read off the event loop (None without
        a GPU or a pid)."""
        if self.gpu is None or self.total_mb is None or pid is None:
            return None
        return await asyncio.to_thread(self.gpu.process_memory_mb, pid)

    def expect_release(self, model_id: str, used_before_mb: float | None, freed_mb: float) -> None:
        """A model that held ``freed_mb`` was stopped (or slept); NVML should show it soon."""
        if used_before_mb is None or freed_mb <= 0:
            return
        deadline = time.monotonic() + self.config.swapper.vram_release_timeout
        self._releases.append(
            _Release(model_id, used_before_mb - _RELEASE_SHARE * freed_mb, deadline)
        )

    async def wait_for_memory(self, model: ModelRuntime, need_mb: float) -> None:
        """Before a load: wait until NVML shows recently freed memory back and ``need_mb`` free.

        CUDA's free figure lags an unload by 0.5-1.5 s, and vLLM refuses to start while free
        memory is below what it reserves. Bounded by ``swapper.vram_release_timeout``; logged.
        """
        if self.gpu is None or self.total_mb is None:
            return
        reserve = self.config.swapper.vram_reserve_mb
        started = time.monotonic()
        timeout = self.config.swapper.vram_release_timeout
        deadline = started + timeout
        announced = False
        while True:
            now = time.monotonic()
            self._releases = [r for r in self._releases if r.deadline > now]
            totals = await asyncio.to_thread(self.gpu.totals_mb)
            if totals is None:
                return
            _, used, free = totals
            # A release seen through is done with: memory used again later is another matter.
            self._releases = pending = [r for r in self._releases if used > r.used_mb]
            enough = need_mb <= 0 or free >= min(need_mb, max(0.0, self.total_mb - reserve))
            if not pending and enough:
                waited = now - started
                if waited >= _POLL:
                    logger.info(
                        "%s: waited %.2fs for GPU memory to be released (%.0f MiB free)",
                        model.id,
                        waited,
                        free,
                    )
                return
            why = (
                f"still waiting for {', '.join(r.model_id for r in pending)} to release"
                if pending
                else f"{free:.0f} MiB free, {need_mb:.0f} MiB wanted"
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
                self._releases = []
                return
            await asyncio.sleep(_POLL)
