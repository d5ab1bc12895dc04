"""Random traffic against the placement rules: the invariants hold whatever the order.

Hypothesis draws request bursts, releases, operator unloads, crashes and reloads over models of
random sizes (some sleep-capable, one pinned, one too big to ever fit) and a random slot count.
After every step: never more models in slots than ``max_concurrent_models``, never more VRAM held
on the fake GPU than the budget; at every admission: the overtake bound (see ``admitted``). At
the end every request has been answered (served, or refused with a clear error), nothing hangs,
every operator unload has returned, and nothing outlives the coordinator.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapper.config import Config
from swapper.errors import SwapperError
from swapper.scheduling.coordinator import Lease, SwapCoordinator
from swapper.scheduling.model_state import PHASES, ModelStatus, Waiter
from swapper.scheduling.runtime import ModelRuntime
from tests.conftest import fake_config
from tests.fakes import FakeGpu, FakeWorld

BUDGET = 10000.0
MODELS = "abcde"
MAX_OVERTAKE = 2

operation = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(MODELS), st.integers(1, 3)),
    st.tuples(st.just("release"), st.integers(0, 50), st.just(0)),
    st.tuples(st.just("unload"), st.sampled_from(MODELS), st.just(0)),
    st.tuples(st.just("crash"), st.sampled_from(MODELS), st.just(0)),
    st.tuples(st.just("reload"), st.sampled_from("bcd"), st.just(0)),
    # Other operations run back to back, synchronously; this one lets the coordinator's work
    # advance: to its next event (0), or until no load, unload or probe runs (1).
    st.tuples(st.just("progress"), st.just(""), st.integers(0, 1)),
)
scenario = st.fixed_dictionaries(
    {
        "slots": st.integers(1, 3),
        "sizes": st.lists(
            st.sampled_from([1000.0, 2500.0, 4000.0, 6000.0]), min_size=4, max_size=4
        ),
        "sleepy": st.lists(st.booleans(), min_size=4, max_size=4),
        # At least 12: shorter runs seldom get as far as an eviction with requests overtaking.
        "operations": st.lists(operation, min_size=12, max_size=40),
    }
)


class _Admission(asyncio.Future[str]):
    """A waiter's future that reports the moment the coordinator admits it (set_result)."""

    def __init__(self, on_admit: Any) -> None:
        super().__init__()
        self._on_admit = on_admit

    def set_result(self, result: str) -> None:
        self._on_admit()
        super().set_result(result)


async def _progress(coordinator: SwapCoordinator, events: asyncio.Queue[Any], quiet: bool) -> None:
    """Let the coordinator's loads, unloads, probes and measurements advance: to its next
    event, or (``quiet``) until none runs. Timers (drain, idle) are not waited for."""
    async with asyncio.timeout(20):
        while busy := [
            t for t in coordinator.background_tasks() if not t.get_name().startswith("watch:")
        ]:
            event = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait([event, *busy], return_when=asyncio.FIRST_COMPLETED)
            event.cancel()
            if event in done and not quiet:
                return


async def _run(
    slots: int,
    sizes: list[float],
    sleepy: list[bool],
    operations: list[tuple[str, Any, int]],
    state_dir: str,
) -> None:
    world = FakeWorld()
    models: dict[str, dict[str, Any]] = {
        m: {"vram_mb": size, "sleepy": asleep, "sleep_mb": 300.0}
        for m, size, asleep in zip(MODELS, sizes, sleepy, strict=False)  # "e" is added below
    }
    models["e"] = {"vram_mb": BUDGET + 1}  # can never fit
    settings_ = {
        "mode": "multi-active",
        "max_concurrent_models": slots,
        "vram_budget_mb": BUDGET,
        "default_model": "a",
        "drain_timeout": 0.05,
        "vram_release_timeout": 0.5,
        "max_overtake": MAX_OVERTAKE,
        "state_file": str(Path(state_dir) / "state.json"),
    }
    present = set(models)

    def config() -> Config:
        chosen = {m: e for m, e in models.items() if m in present}
        return fake_config(world, chosen, swapper=settings_, name="fuzz.yaml")[0]

    _, registry = fake_config(world, models, swapper=settings_)
    coordinator = SwapCoordinator(config(), registry, FakeGpu(world, BUDGET))
    requests: list[asyncio.Task[Lease]] = []
    unloads: list[asyncio.Task[None]] = []
    held: list[Lease] = []
    # Arrival index of every request still waiting, and how often each was overtaken.
    arrival: dict[Waiter, int] = {}
    overtaken: collections.Counter[int] = collections.Counter()
    arrivals = itertools.count()

    # The overtake bound, as Admission._place and _admit_queued implement it: _place
    # walks the waiters in arrival order; the first whose model can be neither served nor
    # started (the *blocked* waiter W, always the oldest waiter for its model) chooses models
    # to evict, and each gets an ``eviction`` for ``W.model``. A request admitted to such a model
    # (at once, or from the queue) that arrived after W overtakes W; every waiter before W
    # is served freely, and so is any model not being evicted for W (it holds no one up). So:
    # no waiting request is overtaken by more than max_overtake later-arriving requests for
    # the models evicted for it. Checked at the moment of each admission, counted over W's
    # whole wait (the coordinator counts per stretch as the blocked waiter; no run here has
    # needed more than max_overtake in total).
    def admitted(index: int, model: ModelRuntime) -> None:
        """Called at the moment of admission: count the overtake, if it is one."""
        target = model.eviction.target if model.eviction is not None else None
        if target is None:
            return  # not being evicted: its requests do not hold anyone up
        heads = [
            arrival[w]
            for w in coordinator.waiting()
            if w.model is target and not w.future.done() and w in arrival
        ]
        if heads and index > min(heads):
            overtaken[min(heads)] += 1
            assert overtaken[min(heads)] <= MAX_OVERTAKE, (min(heads), overtaken)

    def request(model_id: str) -> None:
        index = next(arrivals)
        ticket = coordinator.enqueue(model_id)  # synchronous: the arrival order is exact
        if isinstance(ticket, Lease):
            admitted(index, coordinator.runtime(model_id))
        elif ticket.future.done():  # admitted from the queue within enqueue itself
            admitted(index, ticket.model)
        else:
            arrival[ticket] = index
            ticket.future = _Admission(lambda: admitted(index, ticket.model))
        requests.append(asyncio.ensure_future(coordinator.redeem(ticket)))

    def check() -> None:
        serving = [
            m
            for m, d in coordinator.status().models.items()
            if d.status in (ModelStatus.LOADING, ModelStatus.LOADED)
        ]
        assert len(serving) <= slots, serving
        # Processes that are up and not asleep: never more than the slots, at any moment.
        assert world.max_awake <= slots, (world.alive, world.asleep)
        assert world.max_held <= BUDGET, world.held
        # Every model is in a phase its status declares (the table against use).
        for model_id in coordinator.status().models:
            runtime = coordinator.runtime(model_id)
            assert runtime.phase in PHASES[runtime.status], (model_id, runtime.status)

    try:
        with coordinator.events.subscribe() as events:
            for kind, target, count in operations:
                if kind == "request":
                    for _ in range(count):
                        with contextlib.suppress(SwapperError):  # refused at once: answered
                            request(target)
                elif kind == "release":
                    done = [
                        t
                        for t in requests
                        if t.done() and not t.cancelled() and t.exception() is None
                    ]
                    if done:
                        task = done[target % len(done)]
                        requests.remove(task)
                        task.result().release()
                elif kind == "unload" and target in present:
                    unloads.append(asyncio.ensure_future(coordinator.unload(target)))
                elif kind == "crash" and target in world.alive and target in world.exits:
                    world.crash(target)
                elif kind == "reload":  # the model leaves the config, or comes back
                    present.symmetric_difference_update({target})
                    coordinator.reload(config())
                elif kind == "progress":
                    await _progress(coordinator, events, quiet=bool(count))
                check()
            # Everyone gets an answer once every lease is given back.
            async with asyncio.timeout(20):
                while requests:
                    await asyncio.wait(requests, return_when=asyncio.FIRST_COMPLETED)
                    for task in [t for t in requests if t.done()]:
                        requests.remove(task)
                        error = task.exception()
                        if error is None:
                            held.append(task.result())
                        else:
                            assert isinstance(error, SwapperError), repr(error)
                    for lease in held:
                        lease.release()
                    held.clear()
                    check()
        counts = {m: (d.in_flight, d.queued) for m, d in coordinator.status().models.items()}
        assert set(counts.values()) == {(0, 0)}, counts  # every lease and place given back
    finally:
        for task in requests:
            task.cancel()
        await coordinator.close()
    # Every operator unload ended (close unloads what they waited for) without an error; a
    # model removed by a reload before its unload task first ran is unknown to it (KeyError).
    for outcome in await asyncio.gather(*unloads, return_exceptions=True):
        assert outcome is None or isinstance(outcome, KeyError), repr(outcome)
    assert world.alive == set()


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario)
def test_random_traffic_keeps_slots_and_the_budget(case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        asyncio.run(_run(**case, state_dir=state_dir))
