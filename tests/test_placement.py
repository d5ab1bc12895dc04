"""Placement on a fake GPU: models alongside, LRU eviction, pinning, drain deadline, VRAM wait,
sleeping backends and learned sizes. The fake GPU's used memory follows what the fakes hold."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swapper.errors import ModelUnavailable
from swapper.scheduling.coordinator import Lease, ModelStatus, SwapCoordinator
from tests.conftest import CoordinatorFactory, fake_config
from tests.fakes import Behaviour, FakeGpu, FakeWorld, finished, queued, until

pytestmark = pytest.mark.anyio

Make = Callable[..., SwapCoordinator]


@pytest.fixture
def make(coordinator_factory: CoordinatorFactory) -> Make:
    """The shared factory, in multi-active mode on a fake 16 GiB GPU (``gpu=False``: none)."""

    def factory(
        models: dict[str, dict[str, Any]], *, gpu: bool = True, **swapper: Any
    ) -> SwapCoordinator:
        settings = {"mode": "multi-active", "vram_reserve_mb": 0, **swapper}
        return coordinator_factory(models, gpu=gpu, **settings)

    return factory


async def use(coordinator: SwapCoordinator, model_id: str) -> None:
    """One request to ``model_id``, start to end."""
    lease = await coordinator.acquire(model_id)
    lease.release()


def statuses(coordinator: SwapCoordinator) -> dict[str, str]:
    return {mid: m.status.value for mid, m in coordinator.status().models.items()}


async def test_models_that_fit_load_alongside(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {"a": {"vram_mb": 6000}, "b": {"vram_mb": 6000}},
        max_concurrent_models=2,
        vram_budget_mb=14000,
    )
    await use(coordinator, "a")
    await use(coordinator, "b")
    assert statuses(coordinator) == {"a": "LOADED", "b": "LOADED"}
    assert world.max_alive == 2 and ("stop", "a") not in world.events
    assert coordinator.status().resident == ["a", "b"]
    assert coordinator.status().vram.committed_mb == 12000


async def test_least_recently_used_idle_model_is_evicted_to_fit(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {m: {"vram_mb": 6000} for m in "abc"}, max_concurrent_models=3, vram_budget_mb=14000
    )
    await use(coordinator, "a")
    await use(coordinator, "b")
    await use(coordinator, "a")  # b is now the least recently used
    await use(coordinator, "c")
    assert statuses(coordinator) == {"a": "LOADED", "b": "UNLOADED", "c": "LOADED"}
    assert world.events[-2:] == [("stop", "b"), ("start", "c")]


async def test_the_count_limit_evicts_without_a_gpu(make: Make, world: FakeWorld) -> None:
    coordinator = make({m: {} for m in "abc"}, gpu=False, max_concurrent_models=2)
    assert coordinator.status().vram.budget_mb is None
    await use(coordinator, "b")
    await use(coordinator, "a")
    await use(coordinator, "c")
    assert statuses(coordinator) == {"a": "LOADED", "b": "UNLOADED", "c": "LOADED"}
    assert world.max_alive == 2


async def test_a_busy_model_is_passed_over_for_an_idle_one(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {m: {"vram_mb": 6000} for m in "abc"}, max_concurrent_models=3, vram_budget_mb=14000
    )
    busy = await coordinator.acquire("a")  # a is the least recently used, but busy
    await use(coordinator, "b")
    await use(coordinator, "c")
    assert statuses(coordinator) == {"a": "LOADED", "b": "UNLOADED", "c": "LOADED"}
    busy.release()


async def test_eviction_waits_for_in_flight_requests(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {"a": {"vram_mb": 9000}, "b": {"vram_mb": 9000}},
        max_concurrent_models=2,
        vram_budget_mb=14000,
    )
    lease = await coordinator.acquire("a")
    want_b = asyncio.create_task(coordinator.acquire("b"))
    # Queued: the eviction is decided (synchronously); stopping a now would already show.
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "b's request to queue")
    assert ("stop", "a") not in world.events
    assert coordinator.model_status("a") == ModelStatus.LOADED
    lease.release()
    (await want_b).release()
    assert world.events[-2:] == [("stop", "a"), ("start", "b")]
    assert lease.cut_reason is None


async def test_past_drain_timeout_in_flight_requests_are_cut_off_with_a_reason(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {"a": {"vram_mb": 9000}, "b": {"vram_mb": 9000}},
        max_concurrent_models=2,
        vram_budget_mb=14000,
        drain_timeout=0.2,
    )
    lease = await coordinator.acquire("a")  # never released in time
    lease_b = await coordinator.acquire("b")
    assert ("stop", "a") in world.events
    assert lease.cut_reason is not None
    assert "make room for 'b'" in lease.cut_reason and "drain_timeout" in lease.cut_reason
    lease.release()
    lease_b.release()
    assert statuses(coordinator) == {"a": "UNLOADED", "b": "LOADED"}


async def test_pinned_models_are_evicted_last(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {m: {"vram_mb": 6000} for m in "abc"},
        default_model="a",
        max_concurrent_models=3,
        vram_budget_mb=14000,
    )
    await use(coordinator, "a")  # the default model: pinned, and least recently used
    await use(coordinator, "b")
    await use(coordinator, "c")
    assert statuses(coordinator) == {"a": "LOADED", "b": "UNLOADED", "c": "LOADED"}
    assert coordinator.status().models["a"].pinned is True


async def test_the_default_model_can_be_unpinned(make: Make, world: FakeWorld) -> None:
    models: dict[str, dict[str, Any]] = {m: {"vram_mb": 6000} for m in "abc"}
    models["a"]["pinned"] = False
    coordinator = make(models, default_model="a", max_concurrent_models=3, vram_budget_mb=14000)
    await use(coordinator, "a")
    await use(coordinator, "b")
    await use(coordinator, "c")
    assert statuses(coordinator) == {"a": "UNLOADED", "b": "LOADED", "c": "LOADED"}


async def test_a_pinned_model_still_goes_when_nothing_else_can(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {"a": {"vram_mb": 9000, "pinned": True}, "b": {"vram_mb": 9000}},
        max_concurrent_models=2,
        vram_budget_mb=14000,
    )
    await use(coordinator, "a")
    await use(coordinator, "b")
    assert statuses(coordinator) == {"a": "UNLOADED", "b": "LOADED"}


async def test_a_model_that_can_never_fit_is_refused_at_once(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {"a": {"vram_mb": 6000}, "huge": {"vram_mb": 20000}}, max_concurrent_models=2
    )  # budget: the fake GPU's 16384 MiB
    await use(coordinator, "a")
    with pytest.raises(ModelUnavailable) as info:
        coordinator.enqueue("huge")  # at once: refused before it could ever queue
    assert "20000 MiB" in info.value.message and "16384 MiB budget" in info.value.message
    assert world.starts("huge") == 0 and coordinator.model_status("a") == ModelStatus.LOADED


async def test_the_next_load_waits_until_the_gpu_shows_memory_released(
    make: Make, world: FakeWorld, caplog: pytest.LogCaptureFixture
) -> None:
    world.release_lag = 0.4  # CUDA's free figure lags an unload
    coordinator = make(
        {"a": {"vram_mb": 10000}, "b": {"vram_mb": 10000}},
        max_concurrent_models=2,
        vram_release_timeout=5,
    )
    gpu = coordinator.placement.gpu
    assert isinstance(gpu, FakeGpu)
    await use(coordinator, "a")
    caplog.set_level(logging.INFO, "swapper.placement")
    await use(coordinator, "b")
    # b started only once a's memory showed free: never more than the GPU holds.
    assert world.events[-2:] == [("stop", "a"), ("start", "b")]
    assert gpu.used_mb() == 10000
    waited = [r.message for r in caplog.records if "for GPU memory" in r.message]
    assert waited and waited[0].startswith("b: waited")


async def test_the_memory_wait_is_bounded_and_logged(
    make: Make, world: FakeWorld, caplog: pytest.LogCaptureFixture
) -> None:
    world.release_lag = 30  # the memory never shows up in time
    coordinator = make(
        {"a": {"vram_mb": 10000}, "b": {"vram_mb": 10000}},
        max_concurrent_models=2,
        vram_release_timeout=0.3,
    )
    await use(coordinator, "a")
    caplog.set_level(logging.INFO, "swapper.placement")
    gpu = coordinator.placement.gpu
    assert isinstance(gpu, FakeGpu)
    await use(coordinator, "b")
    assert any("gave up waiting" in r.message for r in caplog.records)
    # b loaded while a's memory still showed used (for 30 s): the wait did not run to the end.
    assert gpu.used_mb() == 20000


async def test_measured_size_replaces_the_estimate_and_survives_a_restart(
    make: Make, world: FakeWorld, tmp_path: Path
) -> None:
    models = {"a": {"vram_mb": 4000, "actual_mb": 9000}, "b": {"vram_mb": 6000}}
    coordinator = make(models, max_concurrent_models=2, vram_budget_mb=14000)
    await use(coordinator, "a")
    await finished(coordinator, "measure:a")  # the measurement runs in a task after the load
    assert coordinator.status().models["a"].vram_mb == 9000
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["models"]["a"]["vram_mb"] == 9000
    await coordinator.close()
    # A new coordinator (a restart) plans with the learned 9000, not the estimate of 4000:
    # a and b no longer fit together in 14000.
    again = make(models, max_concurrent_models=2, vram_budget_mb=14000)
    assert again.status().models["a"].predicted_vram_mb == 9000
    await use(again, "a")
    await use(again, "b")
    assert statuses(again) == {"a": "UNLOADED", "b": "LOADED"}
    # A changed entry is another setup: its old measurement no longer applies.
    changed = make(
        {"a": {"vram_mb": 4000, "note": "q8"}, "b": {"vram_mb": 6000}},
        max_concurrent_models=2,
        vram_budget_mb=14000,
    )
    assert changed.status().models["a"].predicted_vram_mb == 4000


async def test_a_sleeping_backend_sleeps_instead_of_stopping_and_wakes(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {"a": {"vram_mb": 6000, "sleepy": True, "sleep_mb": 500}, "b": {"vram_mb": 6000}},
        mode="single-active",
        max_concurrent_models=1,
        vram_budget_mb=14000,
    )
    await use(coordinator, "a")
    await use(coordinator, "b")
    assert statuses(coordinator) == {"a": "SLEEPING", "b": "LOADED"}
    assert "a" in world.alive and ("sleep", "a") in world.events
    assert coordinator.status().models["a"].vram_mb == 500
    await use(coordinator, "a")
    assert statuses(coordinator) == {"a": "LOADED", "b": "UNLOADED"}
    assert world.starts("a") == 1 and ("wake", "a") in world.events


async def test_a_sleeping_backend_is_stopped_when_its_memory_is_needed(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {
            "a": {"vram_mb": 6000, "sleepy": True, "sleep_mb": 1000},
            "b": {"vram_mb": 6000},
            "big": {"vram_mb": 13500},
        },
        mode="single-active",
        max_concurrent_models=1,
        vram_budget_mb=14000,
    )
    await use(coordinator, "a")
    await use(coordinator, "b")
    assert statuses(coordinator)["a"] == "SLEEPING"
    await use(coordinator, "big")  # 13500 + a's 1000 asleep would not fit
    assert statuses(coordinator) == {"a": "UNLOADED", "b": "UNLOADED", "big": "LOADED"}
    assert "a" not in world.alive


async def test_unloading_a_sleeping_model_stops_it(make: Make, world: FakeWorld) -> None:
    coordinator = make({"a": {"sleepy": True}}, mode="single-active", max_concurrent_models=1)
    await use(coordinator, "a")
    await coordinator.unload("a")
    assert coordinator.model_status("a") == ModelStatus.SLEEPING and "a" in world.alive
    await coordinator.unload("a")
    assert coordinator.model_status("a") == ModelStatus.UNLOADED and "a" not in world.alive


async def test_a_backend_that_dies_asleep_is_failed(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {"a": {"sleepy": True}, "b": {}}, mode="single-active", max_concurrent_models=1
    )
    await use(coordinator, "a")
    await use(coordinator, "b")
    world.crash("a")
    await coordinator.wait_for_status("a", ModelStatus.FAILED)
    assert "died" in (coordinator.status().models["a"].last_error or "")
    await use(coordinator, "a")  # the next request starts it again
    assert world.starts("a") == 2


async def test_requests_for_an_evicted_model_cannot_starve_the_waiting_one(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {"a": {"vram_mb": 9000}, "b": {"vram_mb": 9000}},
        max_concurrent_models=2,
        vram_budget_mb=14000,
        max_overtake=2,
    )
    first = await coordinator.acquire("a")
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "b's request to queue")
    # Later requests for a may overtake b twice; the third waits behind b.
    overtakers: list[Lease] = [await coordinator.acquire("a") for _ in range(2)]
    third = asyncio.create_task(coordinator.acquire("a"))
    await until(coordinator, lambda: queued(coordinator, "a") == 1, "the third to queue")
    for lease in [first, *overtakers]:
        lease.release()
    (await want_b).release()
    (await third).release()
    starts = [e for e in world.events if e[0] == "start"]
    assert starts == [("start", "a"), ("start", "b"), ("start", "a")]


async def test_the_drain_deadline_holds_for_requests_admitted_from_the_queue(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {"a": {"vram_mb": 1000}, "b": {"vram_mb": 1000}}, max_concurrent_models=1, drain_timeout=0.2
    )
    world.queue("a", Behaviour.GATED)
    want_a = asyncio.create_task(coordinator.acquire("a"))
    await coordinator.wait_for_status("a", ModelStatus.LOADING)
    want_b = asyncio.create_task(coordinator.acquire("b"))  # queued while a still loads
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "b's request to queue")
    world.gates["a"].set()
    lease = await want_a  # admitted from the queue; it never ends in time
    (await want_b).release()
    assert lease.cut_reason is not None and "make room for 'b'" in lease.cut_reason
    lease.release()


async def test_an_operator_unload_keeps_the_eviction_deadline(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {"a": {"vram_mb": 1000}, "c": {"vram_mb": 1000}}, max_concurrent_models=1, drain_timeout=0.2
    )
    lease = await coordinator.acquire("a")
    want_c = asyncio.create_task(coordinator.acquire("c"))
    await until(coordinator, lambda: queued(coordinator, "c") == 1, "c's request to queue")
    unloading = asyncio.create_task(coordinator.unload("a"))
    (await want_c).release()
    assert lease.cut_reason is not None
    lease.release()
    await unloading


async def test_a_model_removed_while_it_loads_is_still_stopped(
    make: Make, world: FakeWorld, tmp_path: Path
) -> None:
    models = {"a": {"vram_mb": 9000}, "b": {"vram_mb": 9000}}
    coordinator = make(models, max_concurrent_models=2, vram_budget_mb=16000)
    want_a = coordinator.enqueue("a")  # synchronous: a is LOADING, its load task not yet run
    assert coordinator.model_status("a") == ModelStatus.LOADING
    smaller, _ = fake_config(
        world,
        {"b": {"vram_mb": 9000}},
        swapper={
            "mode": "multi-active",
            "max_concurrent_models": 2,
            "vram_budget_mb": 16000,
            "state_file": str(tmp_path / "state.json"),
        },
    )
    coordinator.reload(smaller)
    with pytest.raises(Exception, match="removed from the config"):
        await coordinator.redeem(want_a)
    await use(coordinator, "b")  # a must be gone (or counted) before b's 9000 MiB fit
    assert world.max_held <= 16000 and "a" not in world.alive


async def test_memory_seen_back_does_not_hold_up_later_loads(
    make: Make, world: FakeWorld, caplog: pytest.LogCaptureFixture
) -> None:
    world.release_lag = 0.2  # c's load waits for a's memory to show free
    release_timeout = 30.0
    coordinator = make(
        {"a": {"vram_mb": 8000}, "c": {"vram_mb": 8000}, "d": {"vram_mb": 4000}},
        max_concurrent_models=3,
        vram_budget_mb=14000,
        vram_release_timeout=release_timeout,
    )
    await use(coordinator, "a")
    await use(coordinator, "c")  # evicts a, and waits until its memory shows free
    caplog.set_level(logging.INFO, "swapper.placement")
    started = asyncio.get_running_loop().time()
    await use(coordinator, "d")  # fits beside c: nothing to wait for
    # Held up, d would wait out the whole vram_release_timeout (and log it).
    assert asyncio.get_running_loop().time() - started < release_timeout
    assert not [r for r in caplog.records if "GPU memory" in r.message]
