"""Per-GPU accounting: each GPU's budget, what the models on it are charged, and where a model
that wants to load goes (and which models on *those* GPUs make room for it).

A model holding memory is charged on the GPUs it was placed on; a model split over several
GPUs is charged its size evenly across them. ``gpus: auto`` prefers one GPU that fits, the one
with the most free budget, and splits over the fewest GPUs only when no single GPU could ever
hold it. Eviction is decided per GPU: only models on the chosen GPUs are evicted for memory
(``max_concurrent_models`` stays a node-wide count of slots, so a slot may come from anywhere).

Without any GPU known (no NVML, no budget map) there is one pseudo-device, :data:`NO_GPU`,
that every model is placed on: the single budget of ``vram_budget_mb`` (or none).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swapper.scheduling.model_state import ModelStatus

if TYPE_CHECKING:
    from swapper.scheduling.runtime import ModelRuntime

__all__ = [
    "NO_GPU",
    "Device",
    "DeviceChoice",
    "GpuPlanner",
    "charges_by_device",
    "gpu_options",
]

_S = ModelStatus

#: The one pseudo-device of a node where no GPU is known (not an NVML index).
NO_GPU = -1


@dataclass(frozen=True)
class Device:
    """One GPU placement can put models on."""

    index: int
    name: str | None = None
    uuid: str = ""
    #: NVML's total memory in MiB; None where the GPU is known from the config only.
    total_mb: float | None = None


@dataclass
class DeviceChoice:
    """The outcome of :meth:`GpuPlanner.choose`: the GPUs chosen, and what to evict first."""

    gpus: tuple[int, ...] | None = None
    #: It fits on ``gpus`` now.
    start: bool = False
    #: (model, full) pairs to move out first.
    evict: list[tuple[ModelRuntime, bool]] = field(default_factory=list)


def _cap(budget: float | None) -> float:
    """A budget as a number (no budget: no limit)."""
    return math.inf if budget is None else budget


def _per(need: float, option: Sequence[int]) -> float:
    """Each GPU's share of ``need`` on ``option`` (nothing on no GPU)."""
    return need / len(option) if option else 0.0


def _share(model: ModelRuntime, mb: float) -> Iterable[tuple[int, float]]:
    """``mb`` split evenly over the GPUs ``model`` is placed on."""
    gpus = model.gpus
    for index in gpus:
        yield index, mb / len(gpus)


def charges_by_device(
    models: Iterable[ModelRuntime], *, after_unload: bool = False
) -> dict[int, float]:
    """MiB charged on each GPU by ``models`` now (or, ``after_unload``, once the models on
    their way out are out)."""
    used: dict[int, float] = {}
    for model in models:
        leaving = after_unload and model.status == _S.UNLOADING
        for index, mb in _share(model, model.mb_after_unload if leaving else model.charge_mb):
            used[index] = used.get(index, 0.0) + mb
    return used


def gpu_options(
    need: float, budgets: Mapping[int, float | None], fixed: Sequence[int] | None
) -> list[tuple[int, ...]] | str:
    """The GPU sets ``need`` MiB may go on (``fixed``: exactly those), or why none ever can.

    ``auto`` (``fixed`` None): every single GPU whose budget holds it; failing that, every set
    of the fewest GPUs whose budgets hold an even share each.
    """
    if fixed is not None:
        unknown = [i for i in fixed if i not in budgets]
        if unknown:
            shown = sorted(i for i in budgets if i != NO_GPU)
            return (
                f"is placed on GPU(s) {list(fixed)}, but GPU(s) {unknown} are not among the "
                f"GPUs swapper sees ({shown or 'none'}); check its gpus (or its env's "
                f"CUDA_VISIBLE_DEVICES)"
            )
        share = need / len(fixed)
        short = [i for i in fixed if _cap(budgets[i]) < share]
        if short:
            return (
                f"needs about {share:.0f} MiB on each of GPU(s) {list(fixed)}, more than the "
                f"budget of GPU(s) {short} ({', '.join(f'{budgets[i]:.0f}' for i in short)} MiB)"
            )
        return [tuple(fixed)]
    indexes = sorted(budgets)
    for width in range(1, len(indexes) + 1):
        share = need / width
        sets = [
            combo
            for combo in itertools.combinations(indexes, width)
            if all(_cap(budgets[i]) >= share for i in combo)
        ]
        if sets:
            return sets
    total = sum(b for b in budgets.values() if b is not None)
    if len(indexes) == 1:
        return f"needs about {need:.0f} MiB of VRAM, more than the {total:.0f} MiB budget"
    return (
        f"needs about {need:.0f} MiB of VRAM, more than all {len(indexes)} GPU budget(s) "
        f"together ({total:.0f} MiB)"
    )


class GpuPlanner:
    """Chooses GPUs and evictions for one model, given the budgets and the resident models."""

    def __init__(
        self,
        budgets: Mapping[int, float | None],
        slots: int,
        eviction_key: Callable[[ModelRuntime], tuple[object, ...]],
    ) -> None:
        self.budgets = budgets
        self.slots = slots
        self.eviction_key = eviction_key

    def _short(self, used: Mapping[int, float], gpus: Sequence[int], share: float) -> bool:
        """Some GPU of ``gpus`` lacks ``share`` MiB of budget."""
        for index in gpus:
            budget = self.budgets.get(index)
            if budget is not None and used.get(index, 0.0) + share > budget:
                return True
        return False

    def _room(self, used: Mapping[int, float], gpus: Sequence[int], share: float) -> float:
        """The least budget left on ``gpus`` once ``share`` is placed on each (inf: no budget)."""
        room = math.inf
        for index in gpus:
            budget = self.budgets.get(index)
            if budget is not None:
                room = min(room, budget - used.get(index, 0.0) - share)
        return room

    def choose(
        self, need: float, options: list[tuple[int, ...]], residents: list[ModelRuntime]
    ) -> DeviceChoice:
        """Start on the option with the most free budget if one fits; else wait for models on
        their way out if that is enough; else evict where it is cheapest."""
        now = charges_by_device(residents)
        slots_now = sum(m.holds_slot for m in residents)
        if slots_now + 1 <= self.slots:
            fitting = [o for o in options if not self._short(now, o, _per(need, o))]
            if fitting:
                # Most free budget left; on a tie the lowest indexes (the options' order).
                best = max(fitting, key=lambda o: self._room(now, o, _per(need, o)))
                return DeviceChoice(gpus=best, start=True)
        left = charges_by_device(residents, after_unload=True)
        slots_left = sum(m.status in (_S.LOADING, _S.LOADED) for m in residents)
        if slots_left + 1 <= self.slots:
            for option in options:
                if not self._short(left, option, _per(need, option)):
                    return DeviceChoice(gpus=option)  # the models leaving make room: wait
        candidates = [m for m in residents if m.status in (_S.SLEEPING, _S.LOADED)]
        candidates.sort(key=self.eviction_key)
        best_choice: DeviceChoice | None = None
        best_cost: tuple[object, ...] | None = None
        for option in options:
            evict, short = self._evictions(option, need, candidates, left, slots_left)
            worst = max((self.eviction_key(m) for m, _ in evict), default=())
            cost = (short, worst, len(evict))
            if best_cost is None or cost < best_cost:
                best_choice, best_cost = DeviceChoice(gpus=option, evict=evict), cost
        assert best_choice is not None  # options is never empty
        return best_choice

    def _evictions(
        self,
        option: tuple[int, ...],
        need: float,
        candidates: list[ModelRuntime],
        left: Mapping[int, float],
        slots_left: int,
    ) -> tuple[list[tuple[ModelRuntime, bool]], bool]:
        """The models to move out for ``need`` on ``option``, in eviction order; and whether
        that is still not enough (busy or loading models hold the rest)."""
        share = _per(need, option)
        used = dict(left)
        chosen: list[tuple[ModelRuntime, bool]] = []
        on = set(option)

        def take(model: ModelRuntime, residual: float) -> None:
            for index, mb in _share(model, model.charge_mb - residual):
                used[index] = used.get(index, 0.0) - mb

        # Memory first, from the models on the chosen GPUs only: a model elsewhere is never
        # evicted to make room here.
        for model in candidates:
            if not self._short(used, option, share):
                break
            if not on.intersection(model.gpus):
                continue
            if model.status == _S.SLEEPING:
                chosen.append((model, True))
                take(model, 0.0)
                continue
            slots_left -= 1
            if model.backend.can_sleep and not model.must_stop:
                trial = dict(used)
                for index, mb in _share(model, model.charge_mb - model.sleep_mb):
                    trial[index] = trial.get(index, 0.0) - mb
                if not self._short(trial, option, share):
                    chosen.append((model, False))
                    used = trial
                    continue
            chosen.append((model, True))
            take(model, 0.0)
        # Then a slot, when the node holds max_concurrent_models already: from anywhere.
        taken = {m for m, _ in chosen}
        for model in candidates:
            if slots_left + 1 <= self.slots:
                break
            if model in taken or model.status == _S.SLEEPING:
                continue
            slots_left -= 1
            chosen.append((model, not (model.backend.can_sleep and not model.must_stop)))
        short = self._short(used, option, share) or slots_left + 1 > self.slots
        return chosen, short
