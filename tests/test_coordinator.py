"""The swap coordinator against fake backends: queueing, batching, one load, timeout, crash."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from swapper.config import Config, parse_config
from swapper.coordinator import Lease, ModelStatus, SwapCoordinator
from swapper.errors import ModelNotFound, ModelUnavailable, QueueFull, ServiceUnavailable
from swapper.plugins import load_backends
from tests.fakes import Behaviour, FakePlugin, FakeWorld

pytestmark = pytest.mark.anyio


def make_config(world: FakeWorld, **swapper: Any) -> tuple[Config, Any]:
    registry = load_backends(FakePlugin(world))
    data = {
        "swapper": {"model_swap_timeout": 5, "stop_timeout": 1, **swapper},
        "models": {
            "a": {"backend": "fake", "aliases": ["alpha"]},
            "b": {"backend": "fake"},
            "c": {"backend": "fake"},
        },
    }
    return parse_config(data, "test.yaml", registry.schemas()), registry


@pytest.fixture
async def make(world: FakeWorld) -> AsyncIterator[Callable[..., SwapCoordinator]]:
    made: list[SwapCoordinator] = []

    def factory(**swapper: Any) -> SwapCoordinator:
        config, registry = make_config(world, **swapper)
        made.append(SwapCoordinator(config, registry))
        return made[-1]

    yield factory
    for coordinator in made:
        await coordinator.close()
    assert world.alive == set(), "a fake backend outlived the coordinator"


async def settle() -> None:
    """Let every ready task run to its next await (no wall-clock waiting)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_resolve_ids_and_aliases(make: Callable[..., SwapCoordinator]) -> None:
    coordinator = make()
    assert coordinator.resolve("a") == "a"
    assert coordinator.resolve("alpha") == "a"
    with pytest.raises(ModelNotFound):
        coordinator.resolve("zeta")


async def test_every_model_starts_unloaded(make: Callable[..., SwapCoordinator]) -> None:
    coordinator = make()
    doc = coordinator.status()
    assert doc["active_model"] is None
    assert {m["status"] for m in doc["models"].values()} == {"UNLOADED"}
    assert doc["models"]["a"]["backend"] == "fake"


async def test_concurrent_first_requests_cause_one_load(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = make()
    tasks = [asyncio.create_task(coordinator.acquire("a")) for _ in range(10)]
    await coordinator.wait_for_status("a", ModelStatus.LOADING)
    await settle()
    assert coordinator.status()["models"]["a"]["queued"] == 10
    world.gates["a"].set()
    leases = await asyncio.gather(*tasks)
    assert world.starts("a") == 1
    assert coordinator.status()["models"]["a"]["in_flight"] == 10
    for lease in leases:
        lease.release()
    assert coordinator.status()["models"]["a"]["in_flight"] == 0


async def test_swap_waits_for_in_flight_and_stops_old_before_starting_new(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make()
    lease_a = await coordinator.acquire("a")
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await settle()
    # a is busy: b waits, a stays resident
    assert coordinator.model_status("a") == ModelStatus.LOADED
    assert coordinator.model_status("b") == ModelStatus.UNLOADED
    assert world.starts("b") == 0
    lease_a.release()
    lease_b = await want_b
    assert lease_b.base_url == "http://b.fake.test"
    assert world.events == [("start", "a"), ("stop", "a"), ("start", "b")]
    assert world.max_alive == 1
    assert coordinator.status()["active_model"] == "b"
    assert coordinator.model_status("a") == ModelStatus.UNLOADED
    lease_b.release()


async def test_queued_requests_for_resident_model_are_served_before_the_swap(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = make(max_overtake=0)
    # a1 a2 arrive while a loads, then b1, then a3: a1 and a2 were first and go before the swap;
    # a3 may not overtake b1 (bound 0) and waits for the swap back.
    a1 = asyncio.create_task(coordinator.acquire("a"))
    a2 = asyncio.create_task(coordinator.acquire("a"))
    await settle()
    b1 = asyncio.create_task(coordinator.acquire("b"))
    await settle()
    a3 = asyncio.create_task(coordinator.acquire("a"))
    await settle()
    world.gates["a"].set()
    first = await asyncio.gather(a1, a2)
    await settle()
    assert not a3.done() and not b1.done()
    for lease in first:
        lease.release()
    lease_b = await b1
    assert not a3.done()
    lease_b.release()
    lease_a3 = await a3
    lease_a3.release()
    assert [e for e in world.events if e[0] == "start"] == [("start", "a"), ("start", "b"),
                                                           ("start", "a")]


async def test_interleaved_requests_are_batched_per_model(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = make(max_overtake=2)
    order = ["a", "b", "a", "b", "a", "b"]
    tasks = []
    for name in order:
        tasks.append(asyncio.create_task(coordinator.acquire(name)))
        await settle()
    world.gates["a"].set()
    served: list[str] = []

    async def serve(task: asyncio.Task[Lease]) -> None:
        lease = await task
        served.append(lease.model_id)
        await settle()
        lease.release()

    await asyncio.gather(*(serve(t) for t in tasks))
    # One load each, not one per request: the swap happens at most once per model here.
    assert world.starts("a") == 1
    assert world.starts("b") == 1
    assert served == ["a", "a", "a", "b", "b", "b"]


async def test_steady_traffic_cannot_starve_a_waiting_model(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make(max_overtake=3)
    held = [await coordinator.acquire("a")]
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await settle()
    # New requests for the resident model keep coming; only 3 may overtake b.
    overtakers = [asyncio.create_task(coordinator.acquire("a")) for _ in range(6)]
    await settle()
    admitted = [t for t in overtakers if t.done()]
    assert len(admitted) == 3
    held += [t.result() for t in admitted]
    for lease in held:
        lease.release()
    lease_b = await want_b
    assert lease_b.model_id == "b"
    assert sum(t.done() for t in overtakers) == 3  # the rest wait their turn after b
    lease_b.release()
    for lease in await asyncio.gather(*(t for t in overtakers if not t.done())):
        lease.release()


async def test_load_timeout_fails_waiters_kills_process_and_next_request_retries(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.NEVER_READY)
    coordinator = make(model_swap_timeout=0.2)
    with pytest.raises(ModelUnavailable) as info:
        await coordinator.acquire("a")
    assert info.value.status_code == 503 and info.value.retry_after
    assert "model_swap_timeout" in info.value.message
    doc = coordinator.status()["models"]["a"]
    assert doc["status"] == "FAILED"
    assert "not ready within" in doc["last_error"]
    assert world.events == [("start", "a"), ("stop", "a")]
    assert world.alive == set()
    lease = await coordinator.acquire("a")  # the next request tries again
    assert coordinator.model_status("a") == ModelStatus.LOADED
    assert coordinator.status()["models"]["a"]["last_error"] is None
    lease.release()


async def test_start_failure_and_exit_during_load_are_reported(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.FAIL_START, Behaviour.EXIT_DURING_LOAD)
    coordinator = make()
    with pytest.raises(ModelUnavailable, match="fake start failed"):
        await coordinator.acquire("a")
    with pytest.raises(ModelUnavailable, match="fake backend crashed"):
        await coordinator.acquire("a")
    assert "fake backend crashed" in coordinator.status()["models"]["a"]["last_error"]
    (await coordinator.acquire("a")).release()
    assert world.starts("a") == 3


async def test_failed_load_lets_other_queued_models_proceed(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.FAIL_START)
    coordinator = make()
    want_a = asyncio.create_task(coordinator.acquire("a"))
    want_b = asyncio.create_task(coordinator.acquire("b"))
    with pytest.raises(ModelUnavailable):
        await want_a
    (await want_b).release()
    assert coordinator.status()["active_model"] == "b"


async def test_crash_is_detected_and_next_request_restarts(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make()
    (await coordinator.acquire("a")).release()
    world.crash("a")
    await coordinator.wait_for_status("a", ModelStatus.FAILED)
    doc = coordinator.status()
    assert doc["active_model"] is None
    assert doc["models"]["a"]["pid"] is None
    assert "backend died" in doc["models"]["a"]["last_error"]
    (await coordinator.acquire("a")).release()
    assert world.starts("a") == 2
    assert coordinator.model_status("a") == ModelStatus.LOADED


async def test_client_that_leaves_the_queue_is_forgotten(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make()
    lease_a = await coordinator.acquire("a")
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await settle()
    assert coordinator.status()["models"]["b"]["queued"] == 1
    want_b.cancel()
    await settle()
    assert coordinator.status()["models"]["b"]["queued"] == 0
    lease_a.release()
    await settle()
    # nobody wants b any more: a stays resident, b was never started
    assert coordinator.model_status("a") == ModelStatus.LOADED
    assert world.starts("b") == 0


async def test_admin_load_and_unload(make: Callable[..., SwapCoordinator], world: FakeWorld) -> None:
    coordinator = make()
    await coordinator.load("b")
    assert coordinator.model_status("b") == ModelStatus.LOADED
    lease = await coordinator.acquire("b")
    unload = asyncio.create_task(coordinator.unload("b"))
    await settle()
    assert not unload.done()  # waits for the in-flight request
    lease.release()
    await unload
    assert coordinator.model_status("b") == ModelStatus.UNLOADED
    assert world.alive == set()


async def test_close_stops_everything_and_refuses_new_work(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("b", Behaviour.GATED)
    coordinator = make()
    (await coordinator.acquire("a")).release()
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await coordinator.wait_for_status("b", ModelStatus.LOADING)
    await coordinator.close()
    with pytest.raises(ServiceUnavailable):
        await want_b
    assert world.alive == set()
    with pytest.raises(ServiceUnavailable):
        await coordinator.acquire("a")


async def test_illegal_transition_is_refused(make: Callable[..., SwapCoordinator]) -> None:
    coordinator = make()
    model = coordinator._models["a"]
    with pytest.raises(RuntimeError, match="illegal transition"):
        coordinator._transition(model, ModelStatus.LOADED)


async def test_queue_cap_refuses_beyond_max_queue(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = make(max_queue=2)
    waiting = [asyncio.create_task(coordinator.acquire("a")) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as info:
        await coordinator.acquire("b")
    assert info.value.status_code == 429 and info.value.retry_after
    world.gates["a"].set()
    for lease in await asyncio.gather(*waiting):
        lease.release()
    (await coordinator.acquire("a")).release()  # resident: admitted without queueing


async def test_crash_loop_backs_off_exponentially_and_manual_load_retries_at_once(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    world.queue("a", *[Behaviour.FAIL_START] * 4)
    coordinator = make(max_start_failures=2, retry_backoff=60, retry_backoff_max=1000)
    with pytest.raises(ModelUnavailable):
        await coordinator.acquire("a")
    assert coordinator.status()["models"]["a"]["retry_at"] is None  # one failure: retry freely
    with pytest.raises(ModelUnavailable) as second:
        await coordinator.acquire("a")
    assert second.value.retry_after == 60
    doc = coordinator.status()["models"]["a"]
    assert doc["status"] == "FAILED" and doc["failures"] == 2 and doc["retry_at"] is not None
    # Backing off: refused at once, no new start (no tight restart loop).
    with pytest.raises(ModelUnavailable, match="backing off") as refused:
        await coordinator.acquire("a")
    assert 55 <= refused.value.retry_after <= 60
    assert world.starts("a") == 2
    # An operator's load retries at once; the next failure doubles the back-off.
    with pytest.raises(ModelUnavailable) as third:
        await coordinator.load("a")
    assert third.value.retry_after == 120
    assert world.starts("a") == 3
    with pytest.raises(ModelUnavailable):
        await coordinator.load("a")
    await coordinator.load("a")  # the fifth start succeeds and clears the record
    doc = coordinator.status()["models"]["a"]
    assert doc["failures"] == 0 and doc["retry_at"] is None and doc["status"] == "LOADED"


async def test_frozen_backend_is_killed_after_a_silent_request(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make()
    lease = await coordinator.acquire("a")
    lease.backend_silent()  # the backend still answers its health probe: not frozen
    await settle()
    assert coordinator.model_status("a") == ModelStatus.LOADED
    world.freeze("a")
    lease.backend_silent()
    await coordinator.wait_for_status("a", ModelStatus.FAILED)
    assert "froze" in coordinator.status()["models"]["a"]["last_error"]
    assert world.events[-1] == ("kill", "a")
    lease.release()
    (await coordinator.acquire("a")).release()  # restarted on the next request
    assert world.starts("a") == 2


async def test_reload_keeps_unchanged_restarts_changed_on_next_use_and_unloads_removed(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make(max_overtake=8)
    held = await coordinator.acquire("a")  # mid-request during the reload
    config, _ = make_config(world)
    changed = parse_config(
        {"swapper": {"model_swap_timeout": 5, "stop_timeout": 1},
         "models": {"a": {"backend": "fake", "aliases": ["alpha"]},
                    "b": {"backend": "fake", "note": "changed"},
                    "d": {"backend": "fake"}}},
        "test.yaml", load_backends(FakePlugin(world)).schemas())
    summary = coordinator.reload(changed)
    assert summary == {"added": ["d"], "changed": ["b"], "removed": ["c"], "unchanged": ["a"]}
    assert coordinator.model_status("a") == ModelStatus.LOADED
    assert world.starts("a") == 1  # untouched
    with pytest.raises(ModelNotFound):
        coordinator.resolve("c")
    held.release()
    # b changed while unloaded: its next start uses the new entry
    lease_b = await coordinator.acquire("b")
    assert coordinator._models["b"].backend.entry.note == "changed"  # type: ignore[attr-defined]
    lease_b.release()


async def test_reload_restarts_a_resident_changed_model_on_its_next_request(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make()
    (await coordinator.acquire("a")).release()
    changed = parse_config(
        {"swapper": {"model_swap_timeout": 5, "stop_timeout": 1},
         "models": {"a": {"backend": "fake", "note": "v2"}, "b": {"backend": "fake"}}},
        "test.yaml", load_backends(FakePlugin(world)).schemas())
    assert coordinator.reload(changed)["changed"] == ["a"]
    await settle()
    assert coordinator.model_status("a") == ModelStatus.LOADED  # keeps running until used
    assert world.starts("a") == 1
    lease = await coordinator.acquire("a")
    assert world.events[-2:] == [("stop", "a"), ("start", "a")]
    assert coordinator._models["a"].backend.entry.note == "v2"  # type: ignore[attr-defined]
    lease.release()


async def test_reload_unloads_a_resident_removed_model_once_idle(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make()
    lease = await coordinator.acquire("c")
    smaller = parse_config({"models": {"a": {"backend": "fake"}}}, "test.yaml",
                           load_backends(FakePlugin(world)).schemas())
    assert coordinator.reload(smaller)["removed"] == ["b", "c"]
    await settle()
    assert "c" in world.alive  # its request is still running
    lease.release()
    await settle()
    assert "c" not in world.alive
    assert coordinator.active_model is None


async def test_idle_model_unloads_after_its_ttl_but_never_while_in_flight(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make(default_ttl=0.05)
    lease = await coordinator.acquire("a")
    assert coordinator._models["a"].idle_timer is None  # in flight: no idle clock at all
    lease.release()
    assert coordinator._models["a"].idle_timer is not None
    await coordinator.wait_for_status("a", ModelStatus.UNLOADED)
    assert world.events == [("start", "a"), ("stop", "a")]
    assert coordinator.active_model is None


async def test_a_request_resets_the_idle_clock_and_ttl_zero_means_never(
    make: Callable[..., SwapCoordinator], world: FakeWorld
) -> None:
    coordinator = make(default_ttl=0)
    (await coordinator.acquire("a")).release()
    assert coordinator._models["a"].idle_timer is None  # ttl 0: never unloads when idle
    coordinator.config = parse_config(
        {"swapper": {"default_ttl": 3600}, "models": {"a": {"backend": "fake", "ttl": 0.05},
                                                      "b": {"backend": "fake"}, "c": {"backend": "fake"}}},
        "ttl.yaml", load_backends(FakePlugin(world)).schemas())
    lease = await coordinator.acquire("a")  # the model's own ttl wins over default_ttl
    lease.release()
    first = coordinator._models["a"].idle_timer
    assert first is not None
    (await coordinator.acquire("a")).release()  # a new request restarts the clock
    assert first.cancelled()
    await coordinator.wait_for_status("a", ModelStatus.UNLOADED)
