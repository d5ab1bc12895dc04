"""Where models fit: VRAM accounting, eviction choice and the learned sizes kept across restarts.

The coordinator asks :meth:`Placement.plan` whether a model can load now, and if not which
resident models should make room. A model's size is, in order of trust: what swapper measured
the last time it was resident (kept in the state file), its configured ``vram_mb``, the
backend's own estimate (vLLM reserves ``gpu_memory_utilization`` of each GPU it runs on), the
size of its files where NVML shows GPUs (a GGUF's bytes plus a margin), or unknown (0: only
``max_concurrent_models`` then limits it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from swapper.backends.contract import EVERY_GPU
from swapper.config import Config
from swapper.gpu import GpuStats, parse_visible_devices
from swapper.scheduling.gpu_budget import NO_GPU, Device, GpuPlanner, Need, gpu_options
from swapper.scheduling.memory_wait import ReleaseWatch
from swapper.scheduling.model_state import ModelStatus
from swapper.scheduling.size_book import SizeBook, default_state_file

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
        self._warn_budgets()

    def _warn_budgets(self) -> None:
        """Say once, at startup, where the budgets the config sets do not fit the GPUs NVML
        shows: a scalar above a GPU's total (before per-GPU budgets it meant all GPUs
        together), map keys naming GPUs NVML does not show."""
        if not self.nvml_devices:
            return
        settings = self.config.swapper
        shown = [d.index for d in self.nvml_devices]
        budget = settings.vram_budget_mb
        if isinstance(budget, int | float):
            over = [d for d in self.nvml_devices if d.total_mb is not None and budget > d.total_mb]
            if over:
                logger.warning(
                    "swapper.vram_budget_mb (%.0f MiB) is more than the total of GPU(s) %s "
                    "(%s MiB): the budget is per GPU now, not all GPUs together; each GPU's "
                    "budget is capped at its total",
                    budget,
                    [d.index for d in over],
                    ", ".join(f"{d.total_mb:.0f}" for d in over),
                )
        for name in ("vram_budget_mb", "vram_reserve_mb"):
            value = getattr(settings, name)
            unknown = sorted(set(value) - set(shown)) if isinstance(value, dict) else []
            if unknown:
                logger.warning(
                    "swapper.%s names GPU(s) %s, which NVML does not show (it shows %s); ignored",
                    name,
                    unknown,
                    shown,
                )

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
        """The GPUs ``model`` must go on, or None (``auto``): where it holds memory now; none
        for a backend that uses no GPU of this node; its entry's ``env``
        ``CUDA_VISIBLE_DEVICES`` (the operator's pin wins); its ``gpus`` list; every GPU when
        its args pick devices themselves (see :meth:`Backend.gpu_count`)."""
        fixed = self._fixed(model)
        return () if isinstance(fixed, str) else fixed

    def _fixed(self, model: ModelRuntime, *, placed: bool = True) -> tuple[int, ...] | str | None:
        """:meth:`fixed_gpus` (``placed`` False: as if it held nothing yet), or why the entry's
        ``CUDA_VISIBLE_DEVICES`` names no GPU."""
        if not self.per_gpu:
            return (NO_GPU,)
        if placed and model.holds_memory and model.gpus:
            return model.gpus
        entry = model.backend.entry
        if not model.backend.uses_local_gpu(entry):
            return ()  # a remote server: charged on no GPU
        visible = entry.env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return self._visible(visible)
        if isinstance(entry.gpus, list):
            return tuple(entry.gpus)
        if model.backend.gpu_count() == EVERY_GPU:
            return tuple(d.index for d in self.devices)
        return None

    def _visible(self, visible: str) -> tuple[int, ...] | str:
        """The GPUs an entry's own ``CUDA_VISIBLE_DEVICES`` names, or why a token names none."""
        if visible.strip() in ("", "-1"):
            return ()  # the operator's "no GPU": runs on none, charged nowhere
        top = max(d.index for d in self.devices)
        uuids = [""] * (top + 1)
        for device in self.devices:
            uuids[device.index] = device.uuid
        named = parse_visible_devices(visible, uuids)
        tokens = [t.strip() for t in visible.split(",")]
        if len(named) < len(tokens):
            # CUDA would drop this token and every one after it, silently: say so instead.
            return (
                f"has env CUDA_VISIBLE_DEVICES={visible!r}, whose {tokens[len(named)]!r} names "
                f"none of the GPUs swapper sees ({[d.index for d in self.devices]}); use their "
                f"NVML indexes or UUIDs (or -1 for none)"
            )
        return tuple(named)

    def take_gpus(self, model: ModelRuntime) -> tuple[int, ...]:
        """The GPUs the plan that started ``model`` chose (a model waking keeps its own)."""
        chosen = self._chosen.pop(model.id, None)
        if chosen is not None:
            return chosen
        fixed = self.fixed_gpus(model)
        return fixed if fixed is not None else (self.devices[0].index,)

    def _on(self, model: ModelRuntime) -> tuple[int, ...] | None:
        """The GPUs ``model`` is (or will be) on; None: not chosen yet (``auto``)."""
        if model.holds_memory and model.gpus:
            return model.gpus
        return self.fixed_gpus(model)

    def _estimate(self, model: ModelRuntime, on: tuple[int, ...] | None) -> float | None:
        """The backend's own estimate on the GPUs ``on`` (None: one GPU of those ``auto`` may
        pick, or the number its args declare), from those GPUs' totals; None: no estimate."""
        totals = {d.index: d.total_mb for d in self.nvml_devices}
        pool = on if on else list(totals)
        figures = [
            model.backend.estimate_vram_mb(totals[i]) for i in pool if totals.get(i) is not None
        ] or [model.backend.estimate_vram_mb(None)]
        known = [f for f in figures if f]
        if not known:
            return None
        declared = model.backend.gpu_count()
        width = len(on) if on else max(1, declared or 1)
        # One figure per GPU: charged evenly, so the largest (what vLLM reserves on the
        # largest of them) on each.
        return max(known) * width

    # -- sizes ------------------------------------------------------------------------------

    def predicted_mb(self, model: ModelRuntime, on: tuple[int, ...] | None = None) -> float:
        """What ``model`` will take when loaded (on the GPUs ``on``, default: its own):
        learned, configured, the backend's estimate, its files' size, else 0."""
        entry = model.backend.entry
        learned = self.sizes.get(model.id, entry)
        if learned is not None:
            return learned
        if entry.vram_mb is not None:
            return entry.vram_mb
        estimate = self._estimate(model, on if on is not None else self._on(model))
        if estimate is not None:
            return estimate
        # Only where NVML shows GPUs: without one, sizes stay what the config says.
        hint = model.backend.size_hint_mb() if self.nvml_devices else None
        return hint or 0.0

    def start_need_mb(self, model: ModelRuntime) -> float:
        """Free memory ``model``'s backend needs to start: its predicted size, or more when the
        backend reserves a share of each GPU up front (vLLM refuses to start below
        ``gpu_memory_utilization`` x total, however small the model)."""
        reserved = self._estimate(model, self._on(model)) or 0.0
        return max(self.predicted_mb(model), reserved)

    def pinned(self, model: ModelRuntime) -> bool:
        """Pinned models are evicted last; the default model is pinned unless configured."""
        entry = self.config.models.get(model.id)
        if entry is not None and entry.pinned is not None:
            return entry.pinned
        return model.id == self.config.swapper.default_model

    # -- planning ---------------------------------------------------------------------------

    def _need(self, model: ModelRuntime) -> Need:
        """What ``model`` needs in all on a GPU set (a backend's estimate depends on it)."""
        return lambda option: self.predicted_mb(model, option)

    def _options(self, model: ModelRuntime, *, placed: bool = True) -> list[tuple[int, ...]] | str:
        fixed = self._fixed(model, placed=placed)
        if isinstance(fixed, str):
            return fixed
        if fixed == ():
            return [()]  # runs on no GPU: only slots limit it
        declared = model.backend.gpu_count() if self.per_gpu else None
        resident = placed and model.holds_memory and bool(model.gpus)
        if declared and fixed is not None and len(fixed) < declared and not resident:
            return (
                f"is placed on {len(fixed)} GPU(s) {list(fixed)}, but its args make it use "
                f"{declared}; list at least {declared} GPUs in its gpus (or leave it auto)"
            )
        # A backend that reserves a share of each GPU is never split to make it fit.
        split = model.backend.splits or self._estimate(model, None) is None
        return gpu_options(
            self._need(model), self.budgets(), fixed, width=declared or None, split=split
        )

    def refusal(self, model: ModelRuntime) -> str | None:
        """Why ``model`` can never fit, or None."""
        options = self._options(model)
        if isinstance(options, str):
            return (
                f"Model {model.id!r} {options}; it can never be loaded (check its vram_mb"
                f"{', gpus, args' if self.per_gpu else ''} and swapper.vram_budget_mb)"
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
        choice = planner.choose(self._need(target), options, residents)
        if (
            target.status == _S.SLEEPING
            and not choice.start
            and any(m.in_flight > 0 or m.queued > 0 for m, _ in choice.evict)
        ):
            # Waking on its own GPUs would cut off a busy model: when other GPUs have room for
            # it now, stop the sleeper and start it cold there instead.
            fresh = self._options(target, placed=False)
            if not isinstance(fresh, str) and set(fresh) - set(options):
                elsewhere = [o for o in fresh if o not in options]
                if planner.choose(self._need(target), elsewhere, residents).start:
                    return Plan(evict=[EvictionChoice(target, full=True)])
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
