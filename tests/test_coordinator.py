"""The swap coordinator against fake backends: queueing, batching, one load, timeout, crash."""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref

import pytest

from swapper.errors import ModelNotFound, ModelUnavailable, QueueFull, ServiceUnavailable
from swapper.scheduling.coordinator import Lease, ModelStatus, SwapCoordinator
from swapper.scheduling.model_state import Waiter
from tests.conftest import CoordinatorFactory, fake_config
from tests.fakes import Behaviour, FakeWorld, finished, queued, until

pytestmark = pytest.mark.anyio


def queued_at_least(coordinator: SwapCoordinator, count: int) -> bool:
    """``count`` requests (or more) wait for models."""
    return sum(m.queued for m in coordinator.status().models.values()) >= count


async def test_resolve_ids_and_aliases(coordinator_factory: CoordinatorFactory) -> None:
    coordinator = coordinator_factory()
    assert coordinator.resolve("a") == "a"
    assert coordinator.resolve("alpha") == "a"
    with pytest.raises(ModelNotFound):
        coordinator.resolve("zeta")


async def test_every_model_starts_unloaded(coordinator_factory: CoordinatorFactory) -> None:
    coordinator = coordinator_factory()
    doc = coordinator.status()
    assert doc.active_model is None
    assert {m.status for m in doc.models.values()} == {ModelStatus.UNLOADED}
    assert doc.models["a"].backend == "fake"


async def test_concurrent_first_requests_cause_one_load(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = coordinator_factory()
    tasks = [asyncio.create_task(coordinator.acquire("a")) for _ in range(10)]
    await coordinator.wait_for_status("a", ModelStatus.LOADING)
    await until(coordinator, lambda: queued(coordinator, "a") == 10, "10 requests queued for a")
    world.gates["a"].set()
    leases = await asyncio.gather(*tasks)
    assert world.starts("a") == 1
    assert coordinator.status().models["a"].in_flight == 10
    for lease in leases:
        lease.release()
    assert coordinator.status().models["a"].in_flight == 0


async def test_swap_waits_for_in_flight_and_stops_old_before_starting_new(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory()
    lease_a = await coordinator.acquire("a")
    want_b = asyncio.create_task(coordinator.acquire("b"))
    # Once b's request is queued the coordinator has decided (synchronously) what to do with it.
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "b's request to queue")
    # a is busy: b waits, a stays resident
    assert coordinator.model_status("a") == ModelStatus.LOADED
    assert coordinator.model_status("b") == ModelStatus.UNLOADED
    assert world.starts("b") == 0
    lease_a.release()
    lease_b = await want_b
    assert lease_b.base_url == "http://b.fake.test"
    assert world.events == [("start", "a"), ("stop", "a"), ("start", "b")]
    assert world.max_alive == 1
    assert coordinator.status().active_model == "b"
    assert coordinator.model_status("a") == ModelStatus.UNLOADED
    lease_b.release()


async def test_queued_requests_for_resident_model_are_served_before_the_swap(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = coordinator_factory(max_overtake=0)
    # a1 a2 arrive while a loads, then b1, then a3: a1 and a2 were first and go before the swap;
    # a3 may not overtake b1 (bound 0) and waits for the swap back.
    a1 = asyncio.create_task(coordinator.acquire("a"))
    a2 = asyncio.create_task(coordinator.acquire("a"))
    await until(coordinator, lambda: queued(coordinator, "a") == 2, "a1 and a2 to queue")
    b1 = asyncio.create_task(coordinator.acquire("b"))
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "b1 to queue")
    a3 = asyncio.create_task(coordinator.acquire("a"))
    await until(coordinator, lambda: queued(coordinator, "a") == 3, "a3 to queue")
    world.gates["a"].set()
    first = await asyncio.gather(a1, a2)
    # a1 and a2 were admitted in one pass at a's LOADED; a3 would have been admitted in it too.
    assert queued(coordinator, "a") == 1 and queued(coordinator, "b") == 1
    for lease in first:
        lease.release()
    lease_b = await b1
    assert queued(coordinator, "a") == 1 and coordinator.model_status("a") == ModelStatus.UNLOADED
    lease_b.release()
    lease_a3 = await a3
    lease_a3.release()
    assert [e for e in world.events if e[0] == "start"] == [
        ("start", "a"),
        ("start", "b"),
        ("start", "a"),
    ]


async def test_interleaved_requests_are_batched_per_model(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = coordinator_factory(max_overtake=2)
    order = ["a", "b", "a", "b", "a", "b"]
    tasks = []
    for count, name in enumerate(order, 1):
        tasks.append(asyncio.create_task(coordinator.acquire(name)))
        await until(
            coordinator,
            functools.partial(queued_at_least, coordinator, count),
            f"request {count} to queue",
        )
    world.gates["a"].set()
    served: list[str] = []

    async def serve(task: asyncio.Task[Lease]) -> None:
        lease = await task
        served.append(lease.model_id)
        lease.release()

    await asyncio.gather(*(serve(t) for t in tasks))
    # One load each, not one per request: the swap happens at most once per model here.
    assert world.starts("a") == 1
    assert world.starts("b") == 1
    assert served == ["a", "a", "a", "b", "b", "b"]


async def test_steady_traffic_cannot_starve_a_waiting_model(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory(max_overtake=3)
    held = [await coordinator.acquire("a")]
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "b's request to queue")
    # New requests for the resident model keep coming; only 3 may overtake b.
    overtakers = [asyncio.create_task(coordinator.acquire("a")) for _ in range(6)]
    # Admitted ones finish in their first step; the others queue.
    await until(coordinator, lambda: queued(coordinator, "a") == 3, "3 requests for a to queue")
    admitted = [t for t in overtakers if t.done()]
    assert len(admitted) == 3
    held += [t.result() for t in admitted]
    for lease in held:
        lease.release()
    lease_b = await want_b
    assert lease_b.model_id == "b"
    assert queued(coordinator, "a") == 3  # the rest wait their turn after b
    lease_b.release()
    for lease in await asyncio.gather(*(t for t in overtakers if not t.done())):
        lease.release()


async def test_load_timeout_fails_waiters_kills_process_and_next_request_retries(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", Behaviour.NEVER_READY)
    coordinator = coordinator_factory(model_swap_timeout=0.2)
    with pytest.raises(ModelUnavailable) as info:
        await coordinator.acquire("a")
    assert info.value.status_code == 503 and info.value.retry_after
    assert "model_swap_timeout" in info.value.message
    doc = coordinator.status().models["a"]
    assert doc.status == ModelStatus.FAILED
    assert "not ready within" in (doc.last_error or "")
    assert world.events == [("start", "a"), ("stop", "a")]
    assert world.alive == set()
    lease = await coordinator.acquire("a")  # the next request tries again
    assert coordinator.model_status("a") == ModelStatus.LOADED
    assert coordinator.status().models["a"].last_error is None
    lease.release()


async def test_start_failure_and_exit_during_load_are_reported(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", Behaviour.FAIL_START, Behaviour.EXIT_DURING_LOAD)
    coordinator = coordinator_factory()
    with pytest.raises(ModelUnavailable, match="fake start failed"):
        await coordinator.acquire("a")
    with pytest.raises(ModelUnavailable, match="fake backend crashed"):
        await coordinator.acquire("a")
    assert "fake backend crashed" in (coordinator.status().models["a"].last_error or "")
    (await coordinator.acquire("a")).release()
    assert world.starts("a") == 3


async def test_failed_load_lets_other_queued_models_proceed(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", Behaviour.FAIL_START)
    coordinator = coordinator_factory()
    want_a = asyncio.create_task(coordinator.acquire("a"))
    want_b = asyncio.create_task(coordinator.acquire("b"))
    with pytest.raises(ModelUnavailable):
        await want_a
    (await want_b).release()
    assert coordinator.status().active_model == "b"


async def test_crash_is_detected_and_next_request_restarts(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory()
    (await coordinator.acquire("a")).release()
    world.crash("a")
    await coordinator.wait_for_status("a", ModelStatus.FAILED)
    doc = coordinator.status()
    assert doc.active_model is None
    assert doc.models["a"].pid is None
    assert "backend died" in (doc.models["a"].last_error or "")
    (await coordinator.acquire("a")).release()
    assert world.starts("a") == 2
    assert coordinator.model_status("a") == ModelStatus.LOADED


async def test_client_that_leaves_the_queue_is_forgotten(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory()
    lease_a = await coordinator.acquire("a")
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "b's request to queue")
    want_b.cancel()
    await until(coordinator, lambda: queued(coordinator, "b") == 0, "b's request to leave")
    # Releasing a's last request takes every decision at once (synchronously): a swap to b
    # would already have begun, and a would no longer admit requests.
    lease_a.release()
    assert coordinator.model_status("a") == ModelStatus.LOADED
    again = coordinator.enqueue("a")
    assert isinstance(again, Lease)  # resident, admitted at once
    again.release()
    assert world.starts("b") == 0


async def test_admin_load_and_unload(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory()
    await coordinator.load("b")
    assert coordinator.model_status("b") == ModelStatus.LOADED
    lease = await coordinator.acquire("b")
    unload = asyncio.create_task(coordinator.unload("b"))
    # A request made after the unload (tasks run in order) must queue, not be admitted; once
    # it is queued, the unload has taken its decision, and b must still be serving.
    after = asyncio.create_task(coordinator.acquire("b"))
    await until(coordinator, lambda: queued(coordinator, "b") == 1, "a request after the unload")
    assert coordinator.model_status("b") == ModelStatus.LOADED and ("stop", "b") not in world.events
    assert not unload.done()  # waits for the in-flight request
    after.cancel()
    await until(coordinator, lambda: queued(coordinator, "b") == 0, "that request to leave")
    lease.release()
    await unload
    assert coordinator.model_status("b") == ModelStatus.UNLOADED
    assert world.alive == set()


async def test_close_stops_everything_and_refuses_new_work(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("b", Behaviour.GATED)
    coordinator = coordinator_factory()
    (await coordinator.acquire("a")).release()
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await coordinator.wait_for_status("b", ModelStatus.LOADING)
    await coordinator.close()
    with pytest.raises(ServiceUnavailable):
        await want_b
    assert world.alive == set()
    with pytest.raises(ServiceUnavailable):
        await coordinator.acquire("a")


async def test_illegal_transition_is_refused(coordinator_factory: CoordinatorFactory) -> None:
    coordinator = coordinator_factory()
    with pytest.raises(RuntimeError, match="illegal transition"):
        coordinator.runtime("a").transition(ModelStatus.LOADED)


async def test_queue_cap_refuses_beyond_max_queue(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", Behaviour.GATED)
    coordinator = coordinator_factory(max_queue=2)
    waiting = [asyncio.create_task(coordinator.acquire("a")) for _ in range(2)]
    await until(coordinator, lambda: queued(coordinator, "a") == 2, "2 requests to queue")
    with pytest.raises(QueueFull) as info:
        await coordinator.acquire("b")
    assert info.value.status_code == 429 and info.value.retry_after
    world.gates["a"].set()
    for lease in await asyncio.gather(*waiting):
        lease.release()
    (await coordinator.acquire("a")).release()  # resident: admitted without queueing


async def test_crash_loop_backs_off_exponentially_and_manual_load_retries_at_once(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    world.queue("a", *[Behaviour.FAIL_START] * 4)
    coordinator = coordinator_factory(
        max_start_failures=2, retry_backoff=60, retry_backoff_max=1000
    )
    with pytest.raises(ModelUnavailable):
        await coordinator.acquire("a")
    assert coordinator.status().models["a"].retry_at is None  # one failure: retry freely
    with pytest.raises(ModelUnavailable) as second:
        await coordinator.acquire("a")
    assert second.value.retry_after == 60
    doc = coordinator.status().models["a"]
    assert doc.status == ModelStatus.FAILED and doc.failures == 2 and doc.retry_at is not None
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
    doc = coordinator.status().models["a"]
    assert doc.failures == 0 and doc.retry_at is None and doc.status == ModelStatus.LOADED


async def test_frozen_backend_is_killed_after_a_silent_request(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory()
    lease = await coordinator.acquire("a")
    lease.backend_silent()  # the backend still answers its health probe: not frozen
    await finished(coordinator, "probe:a")
    assert coordinator.model_status("a") == ModelStatus.LOADED
    world.freeze("a")
    lease.backend_silent()
    await coordinator.wait_for_status("a", ModelStatus.FAILED)
    assert "froze" in (coordinator.status().models["a"].last_error or "")
    assert world.events[-1] == ("kill", "a")
    lease.release()
    (await coordinator.acquire("a")).release()  # restarted on the next request
    assert world.starts("a") == 2


async def test_reload_keeps_unchanged_restarts_changed_on_next_use_and_unloads_removed(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory(max_overtake=8)
    held = await coordinator.acquire("a")  # mid-request during the reload
    changed, _ = fake_config(
        world, {"a": {"aliases": ["alpha"]}, "b": {"note": "changed"}, "d": {}}
    )
    summary = coordinator.reload(changed)
    assert summary == {"added": ["d"], "changed": ["b"], "removed": ["c"], "unchanged": ["a"]}
    assert coordinator.model_status("a") == ModelStatus.LOADED
    assert world.starts("a") == 1  # untouched
    with pytest.raises(ModelNotFound):
        coordinator.resolve("c")
    held.release()
    # b changed while unloaded: its next start uses the new entry
    lease_b = await coordinator.acquire("b")
    assert coordinator.runtime("b").backend.entry.note == "changed"  # type: ignore[attr-defined]
    lease_b.release()


async def test_reload_restarts_a_resident_changed_model_on_its_next_request(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory()
    (await coordinator.acquire("a")).release()
    changed, _ = fake_config(world, {"a": {"note": "v2"}, "b": {}})
    # reload() takes its decisions synchronously: a restart now would show as UNLOADING here.
    assert coordinator.reload(changed)["changed"] == ["a"]
    assert coordinator.model_status("a") == ModelStatus.LOADED  # keeps running until used
    assert world.starts("a") == 1
    lease = await coordinator.acquire("a")
    assert world.events[-2:] == [("stop", "a"), ("start", "a")]
    assert coordinator.runtime("a").backend.entry.note == "v2"  # type: ignore[attr-defined]
    lease.release()


async def test_reload_unloads_a_resident_removed_model_once_idle(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory()
    lease = await coordinator.acquire("c")
    smaller, _ = fake_config(world, {"a": {}})
    # reload() takes its decisions synchronously, and status changes are sent as they happen:
    # an unload of c begun now would already be in the events.
    with coordinator.events.subscribe() as events:
        assert coordinator.reload(smaller)["removed"] == ["b", "c"]
        changes = [events.get_nowait().data for _ in range(events.qsize())]
    assert not [c for c in changes if c.get("model") == "c"]  # its request still runs
    assert "c" in world.alive
    lease.release()
    await until(coordinator, lambda: "c" not in world.alive, "c to stop")
    assert coordinator.active_model is None


async def test_idle_model_unloads_after_its_ttl_but_never_while_in_flight(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory(default_ttl=0.05)
    lease = await coordinator.acquire("a")
    assert coordinator.runtime("a").idle_timer is None  # in flight: no idle clock at all
    lease.release()
    assert coordinator.runtime("a").idle_timer is not None
    await coordinator.wait_for_status("a", ModelStatus.UNLOADED)
    assert world.events == [("start", "a"), ("stop", "a")]
    assert coordinator.active_model is None


async def test_a_request_resets_the_idle_clock_and_ttl_zero_means_never(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory(default_ttl=0)
    (await coordinator.acquire("a")).release()
    assert coordinator.runtime("a").idle_timer is None  # ttl 0: never unloads when idle
    coordinator.config, _ = fake_config(
        world,
        {"a": {"ttl": 0.05}, "b": {}, "c": {}},
        swapper={"default_ttl": 3600},
        name="ttl.yaml",
    )
    lease = await coordinator.acquire("a")  # the model's own ttl wins over default_ttl
    lease.release()
    first = coordinator.runtime("a").idle_timer
    assert first is not None
    (await coordinator.acquire("a")).release()  # a new request restarts the clock
    assert first.cancelled()
    await coordinator.wait_for_status("a", ModelStatus.UNLOADED)


async def test_three_models_are_served_in_arrival_order_with_bounded_overtakes(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    bound = 1
    coordinator = coordinator_factory(max_overtake=bound)
    busy = await coordinator.acquire("a")  # a is resident and busy while the requests arrive
    arrivals = ["a", "b", "c", "b", "c", "a", "b", "a"]
    admitted: list[int] = []  # arrival indexes, in the order the coordinator admitted them
    tickets: list[Lease | Waiter] = []
    for index, name in enumerate(arrivals):  # enqueue is synchronous: arrival order is exact
        ticket = coordinator.enqueue(name)
        if isinstance(ticket, Lease):
            admitted.append(index)
        else:  # done callbacks run in the order the coordinator admits
            ticket.future.add_done_callback(lambda _, i=index: admitted.append(i))
        tickets.append(ticket)

    async def serve(ticket: Lease | Waiter) -> None:
        (await coordinator.redeem(ticket)).release()

    serving = [asyncio.create_task(serve(t)) for t in tickets]
    busy.release()
    await asyncio.gather(*serving)
    # The first a came before anyone waited. b (arrival 1) waits first, so a is evicted for it;
    # the second a (5) may overtake it (1 of 1); the third a (7) may not. b loads before c
    # because it arrived first, and takes its later request (3) along, overtaking c (2) once;
    # its third (6) waits for the next turn. Then c, b again, and a.
    assert admitted == [0, 5, 1, 3, 2, 4, 6, 7]
    assert [e[1] for e in world.events if e[0] == "start"] == ["a", "b", "c", "b", "a"]
    # The bound, for every request: once every earlier arrival has been admitted (it heads the
    # queue), at most max_overtake later arrivals are admitted before it.
    for index in range(len(arrivals)):
        earlier = [admitted.index(i) for i in range(index)]
        heads_from = max(earlier, default=-1)
        mine = admitted.index(index)
        overtakers = [i for i in admitted[heads_from + 1 : mine] if i > index]
        assert len(overtakers) <= bound, (index, overtakers)


async def test_a_removed_models_log_is_freed(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    """A reload that removes a model frees its ring buffer of backend output (no leak per
    removed model); one that keeps the model keeps the buffer."""
    coordinator = coordinator_factory()
    (await coordinator.acquire("c")).release()
    log_c, log_a = weakref.ref(coordinator.model_log("c")), coordinator.model_log("a")
    log_a.append("kept")
    smaller, _ = fake_config(world, {"a": {"aliases": ["alpha"]}})
    assert coordinator.reload(smaller)["removed"] == ["b", "c"]
    await until(coordinator, lambda: coordinator.active_model is None, "c to unload")
    # Its watcher task ends (seeing the stop, or cancelled by it): then nothing holds the model.
    watchers = [t for t in coordinator.background_tasks() if t.get_name() == "watch:c"]
    if watchers:
        await asyncio.wait(watchers)
    del watchers  # a cancelled task's traceback holds its frame, and so the model
    gc.collect()
    assert log_c() is None, "the removed model's log is still referenced"
    assert coordinator.model_log("a") is log_a and list(log_a.lines) == ["kept"]
