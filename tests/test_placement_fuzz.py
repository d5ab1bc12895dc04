"""Random traffic against the placement rules: the invariants hold whatever the order.

Hypothesis draws request bursts, releases, operator unloads, crashes and reloads over models of random
sizes (some sleep-capable, one pinned, one too big to ever fit) and a random slot count. After
every step: never more models in slots than ``max_concurrent_models``, never more VRAM held on
the fake GPU than the budget. At the end every request has been answered (served, or refused
with a clear error), nothing hangs, and nothing outlives the coordinator.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapper.config import parse_config
from swapper.coordinator import Lease, SwapCoordinator
from swapper.errors import SwapperError
from swapper.plugins import load_backends
from tests.fakes import FakeGpu, FakePlugin, FakeWorld

BUDGET = 10000.0
MODELS = "abcde"

operation = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(MODELS), st.integers(1, 3)),
    st.tuples(st.just("release"), st.integers(0, 50), st.just(0)),
    st.tuples(st.just("unload"), st.sampled_from(MODELS), st.just(0)),
    st.tuples(st.just("crash"), st.sampled_from(MODELS), st.just(0)),
    st.tuples(st.just("reload"), st.sampled_from("bcd"), st.just(0)),
    st.tuples(st.just("settle"), st.just(""), st.just(0)),
)
scenario = st.fixed_dictionaries({
    "slots": st.integers(1, 3),
    "sizes": st.lists(st.sampled_from([1000.0, 2500.0, 4000.0, 6000.0]), min_size=4,
                      max_size=4),
    "sleepy": st.lists(st.booleans(), min_size=4, max_size=4),
    "operations": st.lists(operation, min_size=1, max_size=40),
})


async def _settle(rounds: int = 8) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def _run(slots: int, sizes: list[float], sleepy: list[bool],
               operations: list[tuple[str, Any, int]], state_dir: str) -> None:
    world = FakeWorld()
    registry = load_backends(FakePlugin(world))
    models: dict[str, dict[str, Any]] = {
        m: {"backend": "fake", "vram_mb": size, "sleepy": asleep, "sleep_mb": 300.0}
        for m, size, asleep in zip(MODELS, sizes, sleepy)}
    models["e"] = {"backend": "fake", "vram_mb": BUDGET + 1}  # can never fit
    settings_ = {
        "mode": "multi-active", "max_concurrent_models": slots, "vram_budget_mb": BUDGET,
        "default_model": "a", "model_swap_timeout": 5, "stop_timeout": 1,
        "drain_timeout": 0.05, "vram_release_timeout": 0.5, "max_overtake": 2,
        "state_file": str(Path(state_dir) / "state.json")}
    present = set(models)

    def config() -> Any:
        chosen = {m: e for m, e in models.items() if m in present}
        return parse_config({"swapper": settings_, "models": chosen}, "fuzz.yaml",
                            registry.schemas())

    coordinator = SwapCoordinator(config(), registry, FakeGpu(world, BUDGET))
    requests: list[asyncio.Task[Lease]] = []
    held: list[Lease] = []

    def check() -> None:
        serving = [m for m, d in coordinator.status()["models"].items()
                   if d["status"] in ("LOADING", "LOADED")]
        assert len(serving) <= slots, serving
        # Processes that are up and not asleep: never more than the slots, at any moment.
        assert world.max_awake <= slots, (world.alive, world.asleep)
        assert world.max_held <= BUDGET, world.held

    try:
        for kind, target, count in operations:
            if kind == "request":
                requests += [asyncio.ensure_future(coordinator.acquire(target))
                             for _ in range(count)]
            elif kind == "release":
                done = [t for t in requests if t.done() and not t.cancelled()
                        and t.exception() is None]
                if done:
                    task = done[target % len(done)]
                    requests.remove(task)
                    task.result().release()
            elif kind == "unload" and target in present:
                asyncio.ensure_future(coordinator.unload(target))
            elif kind == "crash" and target in world.alive and target in world.exits:
                world.crash(target)
            elif kind == "reload":  # the model leaves the config, or comes back
                present.symmetric_difference_update({target})
                coordinator.reload(config())
            await _settle()
            check()
        # Everyone gets an answer once every lease is given back.
        deadline = asyncio.get_running_loop().time() + 20
        while requests:
            assert asyncio.get_running_loop().time() < deadline, "a request hung"
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
            await asyncio.sleep(0.01)
        counts = {m: (d["in_flight"], d["queued"])
                  for m, d in coordinator.status()["models"].items()}
        assert set(counts.values()) == {(0, 0)}, counts  # every lease and place given back
    finally:
        for task in requests:
            task.cancel()
        await coordinator.close()
    assert world.alive == set()


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario)
def test_random_traffic_keeps_slots_and_the_budget(case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        asyncio.run(_run(**case, state_dir=state_dir))
