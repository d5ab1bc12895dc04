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
from swapper.gpu import GpuStats, parse_visible_devices
from swapper.scheduling.gpu_budget import NO_GPU, Device, GpuPlanner, gpu_options
from swapper.scheduling.memory_wait import ReleaseWatch
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


class GpuView(Protocol):
    """What placement needs of :class:`swapper.gpu.GpuMonitor` (a fake GPU in tests)."""

    @property
    def available(self) -> bool: ...

    def totals_mb(self) -> tuple[float, float, float] | None: ...

    def gpus(self) -> list[GpuStats]: ...

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
    #: The GPUs (NVML indexes) it goes on; :data:`NO_GPU` alone where no GPU is known.
    gpus: tuple[int, ...] | None = None


class Placement:
    """VRAM accounting for the coordinator: budgets per GPU, sizes, eviction order, released
    memory (see :mod:`swapper.scheduling.gpu_budget` for the per-GPU part)."""

    def __init__(self, config: Config, gpu: GpuView | None) -> None:
        self.config = config
        self.gpu = gpu
        stats = gpu.gpus() if gpu is not None and gpu.available else []
        #: The GPUs NVML showed at startup (empty: none known to NVML).
        self.nvml_devices = [Device(g.index, g.name, g.uuid, g.total_mb) for g in stats]
        self.total_mb = sum(g.total_mb for g in stats) if stats else None
        state = config.swapper.state_file
        self.sizes = SizeBook(Path(state) if state else default_state_file())
        self.releases = ReleaseWatch(self)
        #: NVML's figures as placement last read them (the snapshot shows them, unread since).
        self.last_read: dict[int, GpuStats] = {g.index: g for g in stats}
        #: GPUs chosen by the last plan that said "start", by model id (see :meth:`take_gpus`).
        self._chosen: dict[str, tuple[int, ...]] = {}
        #: Counts backend starts, stops, sleeps and wakes: a change in NVML's used memory across a
        #: span in which it moved by one only is that one model's doing (see :meth:`note_change`).
        self.gpu_changes = 0

    def note_change(self) -> int:
        """A backend is about to start, stop, sleep or wake; return the new count."""
        self.gpu_changes += 1
        return self.gpu_changes

    # -- GPUs and budgets ---------------------------------------------------------------------

    @property
    def devices(self) -> list[Device]:
        """The GPUs models are placed on: NVML's, else those a ``vram_budget_mb`` map names,
        else the one pseudo-device :data:`NO_GPU`."""
        if self.nvml_devices:
            return self.nvml_devices
        budget = self.config.swapper.vram_budget_mb
        if isinstance(budget, dict) and budget:
            return [Device(index) for index in sorted(budget)]
        return [Device(NO_GPU)]

    @property
    def per_gpu(self) -> bool:
        """True when real GPUs are known (each with its own budget)."""
        return self.devices[0].index != NO_GPU

    def budgets(self) -> dict[int, float | None]:
        """Each GPU's budget in MiB (None: unknown)."""
        settings = self.config.swapper
        if not self.per_gpu:
            scalar = settings.vram_budget_mb
            return {NO_GPU: scalar if not isinstance(scalar, dict) else None}
        return {d.index: settings.budget_for(d.index, d.total_mb) for d in self.devices}

    @property
    def budget_mb(self) -> float | None:
        """VRAM models may use together (every GPU's budget); None: unknown."""
        budgets = list(self.budgets().values())
        if any(b is None for b in budgets):
            return None
        return sum(b for b in budgets if b is not None)

    def fixed_gpus(self, model: ModelRuntime) -> tuple[int, ...] | None:
        """The GPUs ``model`` must go on, or None (``auto``): where it holds memory now, its
        entry's ``env`` ``CUDA_VISIBLE_DEVICES`` (the operator's pin wins), its ``gpus`` list."""
        if not self.per_gpu:
            return (NO_GPU,)
        if model.holds_memory and model.gpus:
            return model.gpus
        entry = model.backend.entry
        visible = entry.env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            top = max(d.index for d in self.devices)
            uuids = [""] * (top + 1)
            for device in self.devices:
                uuids[device.index] = device.uuid
            named = parse_visible_devices(visible, uuids)
            # A setting naming no GPU (-1, ""): the backend runs without one, charged nowhere.
            return tuple(named)
        return tuple(entry.gpus) if isinstance(entry.gpus, list) else None

    def take_gpus(self, model: ModelRuntime) -> tuple[int, ...]:
        """The GPUs the plan that started ``model`` chose (a model waking keeps its own)."""
        chosen = self._chosen.pop(model.id, None)
        if chosen is not None:
            return chosen
        fixed = self.fixed_gpus(model)
        return fixed if fixed is not None else (self.devices[0].index,)

    def _width(self, model: ModelRuntime) -> int:
        """How many GPUs ``model`` is (or will be) on, for a backend's per-GPU estimate."""
        gpus = model.gpus if model.holds_memory and model.gpus else self.fixed_gpus(model)
        return max(1, len(gpus)) if gpus else 1

    def _device_total_mb(self) -> float | None:
        """One GPU's total memory (the largest), for a backend's estimate."""
        totals = [d.total_mb for d in self.nvml_devices if d.total_mb is not None]
        return max(totals) if totals else None

    # -- sizes ------------------------------------------------------------------------------

    def predicted_mb(self, model: ModelRuntime) -> float:
        """What ``model`` will take when loaded: learned, configured, estimated, else 0."""
        entry = model.backend.entry
        learned = self.sizes.get(model.id, entry)
        if learned is not None:
            return learned
        if entry.vram_mb is not None:
            return entry.vram_mb
        estimate = model.backend.estimate_vram_mb(self._device_total_mb()) or 0.0
        return estimate * self._width(model)

    def start_need_mb(self, model: ModelRuntime) -> float:
        """Free memory ``model``'s backend needs to start: its predicted size, or more when the
        backend reserves a share of each GPU up front (vLLM refuses to start below
        ``gpu_memory_utilization`` × total, however small the model)."""
        reserved = model.backend.estimate_vram_mb(self._device_total_mb()) or 0.0
        return max(self.predicted_mb(model), reserved * self._width(model))

    def pinned(self, model: ModelRuntime) -> bool:
        """Pinned models are evicted last; the default model is pinned unless configured."""
        entry = self.config.models.get(model.id)
        if entry is not None and entry.pinned is not None:
            return entry.pinned
        return model.id == self.config.swapper.default_model

    # -- planning ---------------------------------------------------------------------------

    def _options(self, model: ModelRuntime) -> list[tuple[int, ...]] | str:
        fixed = self.fixed_gpus(model)
        if fixed == ():
            return [()]  # runs on no GPU: only slots limit it
        return gpu_options(self.predicted_mb(model), self.budgets(), fixed)

    def refusal(self, model: ModelRuntime) -> str | None:
        """Why ``model`` can never fit, or None."""
        options = self._options(model)
        if isinstance(options, str):
            return (
                f"Model {model.id!r} {options}; it can never be loaded (check its vram_mb"
                f"{', gpus' if self.per_gpu else ''} and swapper.vram_budget_mb)"
            )
        return None

    def _eviction_key(self, model: ModelRuntime) -> tuple[object, ...]:
        # Models already draining (an operator's unload, a ttl) are leaving anyway: first.
        return (
            not model.draining,
            self.pinned(model),
            model.status == _S.LOADED,
            model.in_flight > 0 or model.queued > 0,
            model.last_used or model.loaded_at or 0.0,
        )

    def plan(self, target: ModelRuntime, others: Iterable[ModelRuntime]) -> Plan:
        """Can ``target`` load now, and if not, which of ``others`` should make room?

        Models already on their way out count as gone (their end state: asleep or stopped);
        if that is enough, nothing more is evicted and the load waits for them.
        """
        options = self._options(target)
        if isinstance(options, str):
            return Plan(refuse=self.refusal(target))
        residents = [m for m in others if m is not target and m.holds_memory]
        planner = GpuPlanner(
            self.budgets(), self.config.swapper.max_concurrent_models, self._eviction_key
        )
        choice = planner.choose(self.predicted_mb(target), options, residents)
        if choice.start and choice.gpus is not None:
            self._chosen[target.id] = choice.gpus
        return Plan(
            start=choice.start,
            evict=[EvictionChoice(m, full=full) for m, full in choice.evict],
            gpus=choice.gpus,
        )

    # -- released memory ----------------------------------------------------------------------

    async def used_mb(self) -> float | None:
        """NVML's used figure over every GPU, read off the event loop (None without a GPU)."""
        used = await self.device_used_mb()
        return None if used is None else sum(used.values())

    async def device_used_mb(self) -> dict[int, float] | None:
        """NVML's used figure of each GPU, read off the event loop (None without a GPU)."""
        stats = await self.read_gpus()
        return {i: g.used_mb for i, g in stats.items()} if stats else None

    async def read_gpus(self) -> dict[int, GpuStats]:
        """NVML's figures of each GPU by index, read off the event loop (empty without a GPU);
        kept as :attr:`last_read` for the status snapshot."""
        if self.gpu is None or self.total_mb is None:
            return {}
        stats = await asyncio.to_thread(self.gpu.gpus)
        self.last_read = {g.index: g for g in stats}
        return self.last_read

    async def process_mb(self, pid: int | None) -> float | None:
        """What ``pid``'s process tree holds on the GPUs, read off the event loop (None without
        a GPU or a pid)."""
        if self.gpu is None or self.total_mb is None or pid is None:
            return None
        return await asyncio.to_thread(self.gpu.process_memory_mb, pid)

    def expect_release(
        self, model: ModelRuntime, used_before: dict[int, float] | None, freed_mb: float
    ) -> None:
        """``model`` held ``freed_mb`` more than it does now; NVML should show it free soon."""
        self.releases.expect(model, used_before, freed_mb)

    async def wait_for_memory(self, model: ModelRuntime, need_mb: float) -> None:
        """Before a load: wait until NVML shows the memory recently freed on ``model``'s GPUs
        back, and ``need_mb`` free there (see :class:`ReleaseWatch`)."""
        await self.releases.wait(model, need_mb)
