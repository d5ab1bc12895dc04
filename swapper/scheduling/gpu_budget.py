"""Per-GPU accounting: each GPU's budget, what the models on it are charged, and where a model
that wants to load goes (and which models on *those* GPUs make room for it).

A model holding memory is charged on the GPUs it was placed on; a model split over several
GPUs is charged its size evenly across them. ``gpus: auto`` prefers one GPU that fits, the one
with the most free budget (on a tie, the one with the fewest models, so concurrent loads of
unknown size spread), and splits over the fewest GPUs only when no single GPU could ever hold it
(and the backend allows a split). A model whose args declare how many GPUs it uses gets exactly
that many. Eviction is decided per GPU: only models on the chosen GPUs are evicted for memory
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
    "Need",
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


#: MiB a model needs in all on a GPU set (it may depend on the GPUs: vLLM reserves a share of each).
Need = Callable[[tuple[int, ...]], float]


def _per(need: Need, option: tuple[int, ...]) -> float:
    """Each GPU's share of what the model needs on ``option`` (nothing on no GPU)."""
    return need(option) / len(option) if option else 0.0


def _mb(value: float | None) -> str:
    return "no limit" if value is None else f"{value:.0f}"


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
    need: Need,
    budgets: Mapping[int, float | None],
    fixed: Sequence[int] | None,
    *,
    width: int | None = None,
    split: bool = True,
) -> list[tuple[int, ...]] | str:
    """The GPU sets the model may go on (``fixed``: exactly those), or why none ever can.

    ``auto`` (``fixed`` None): every set of ``width`` GPUs (what the model's args declare)
    whose budgets hold an even share each; without a width, every single GPU that holds it,
    failing that (when ``split``) every set of the fewest GPUs that hold an even share each.
    """
    if fixed is not None:
        option = tuple(fixed)
        unknown = [i for i in option if i not in budgets]
        if unknown:
            shown = sorted(i for i in budgets if i != NO_GPU)
            return (
                f"is placed on GPU(s) {list(option)}, but GPU(s) {unknown} are not among the "
                f"GPUs swapper sees ({shown or 'none'}); check its gpus (or its env's "
                f"CUDA_VISIBLE_DEVICES)"
            )
        share = _per(need, option)
        short = [i for i in option if _cap(budgets[i]) < share]
        if short:
            return (
                f"needs about {share:.0f} MiB on each of GPU(s) {list(option)}, more than the "
                f"budget of GPU(s) {short} ({', '.join(_mb(budgets[i]) for i in short)} MiB)"
            )
        return [option]
    indexes = sorted(budgets)
    if width is not None and width > len(indexes):
        return (
            f"uses {width} GPUs (its args say so), but swapper sees only {len(indexes)} ({indexes})"
        )
    widths = [width] if width is not None else range(1, len(indexes) + 1 if split else 2)
    for count in widths:
        sets = [
            combo
            for combo in itertools.combinations(indexes, count)
            if all(_cap(budgets[i]) >= _per(need, combo) for i in combo)
        ]
        if sets:
            return sets
    return _why_not(need, budgets, indexes, widths[-1])


def _why_not(
    need: Need, budgets: Mapping[int, float | None], indexes: list[int], width: int
) -> str:
    """Why no set of ``width`` GPUs holds the model: the GPUs whose budget is too small."""
    if len(indexes) == 1:
        (only,) = indexes
        return (
            f"needs about {need((only,)):.0f} MiB of VRAM, more than the "
            f"{_mb(budgets[only])} MiB budget"
        )
    if width == 1:
        # Each GPU on its own (its backend is never split to fit): what the model needs there
        # against that GPU's budget.
        each = ", ".join(f"{need((i,)):.0f} MiB on GPU {i}" for i in indexes)
        budget = ", ".join(f"GPU {i}: {_mb(budgets[i])}" for i in indexes)
        return (
            f"needs about {each}, more than the budget of GPU(s) {indexes} ({budget} MiB); "
            "its backend is not split over several GPUs to fit"
        )
    # The widest sets failed, so at least one GPU of every set lacks the even share; over the
    # first ``width`` GPUs with the most budget, name those.
    widest = tuple(sorted(sorted(indexes, key=lambda i: -_cap(budgets[i]))[:width]))
    share = _per(need, widest)
    short = [i for i in widest if _cap(budgets[i]) < share]
    return (
        f"needs about {need(widest):.0f} MiB of VRAM; split evenly over {width} GPUs that is "
        f"{share:.0f} MiB on each, more than the budget of GPU(s) {short} "
        f"({', '.join(_mb(budgets[i]) for i in short)} MiB)"
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
        self, need: Need, options: list[tuple[int, ...]], residents: list[ModelRuntime]
    ) -> DeviceChoice:
        """Start on the option with the most free budget if one fits (on a tie, the one with
        the fewest models on it); else wait for models on their way out if that is enough;
        else evict where it is cheapest."""
        now = charges_by_device(residents)
        slots_now = sum(m.holds_slot for m in residents)
        if slots_now + 1 <= self.slots:
            fitting = [o for o in options if not self._short(now, o, _per(need, o))]
            if fitting:
                # Most free budget left; on a tie the fewest models there (models of unknown
                # size, charged nothing, would otherwise all pile onto the first GPU), then
                # the lowest indexes (the options' order).
                def key(option: tuple[int, ...]) -> tuple[float, int]:
                    crowd = sum(1 for m in residents if set(option).intersection(m.gpus))
                    return (self._room(now, option, _per(need, option)), -crowd)

                best = max(fitting, key=key)
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
        need: Need,
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
