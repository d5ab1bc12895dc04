"""Each model's runtime against fake backends: its declared phases, a client's keep_alive,
and a per-model concurrency_limit."""

from __future__ import annotations

import asyncio
import time

import pytest

from swapper.errors import ConfigError, ModelNotFound, QueueFull
from swapper.scheduling.coordinator import SwapCoordinator
from swapper.scheduling.events import Event
from swapper.scheduling.model_state import (
    EXIT_PHASES,
    PHASES,
    TRANSITIONS,
    Exit,
    ModelStatus,
    Phase,
)
from tests.conftest import CoordinatorFactory, fake_config
from tests.fakes import Behaviour, FakeWorld, queued, until

pytestmark = pytest.mark.anyio

_S = ModelStatus


async def status_reached(coordinator: SwapCoordinator, model_id: str, status: ModelStatus) -> None:
    """Wait for ``model_id`` to reach ``status``; fail (not hang) after a generous bound."""
    try:
        async with asyncio.timeout(30):
            await coordinator.wait_for_status(model_id, status)
    except TimeoutError:
        raise AssertionError(f"{model_id} never became {status}") from None


def test_the_phase_table_declares_every_status_and_exit() -> None:
    assert set(PHASES) == set(TRANSITIONS) == set(ModelStatus)
    assert set(EXIT_PHASES) == set(Exit)
    assert set(EXIT_PHASES.values()) == PHASES[_S.UNLOADING]
    declared = {phase for phases in PHASES.values() for phase in phases}
    assert declared == set(Phase), "a phase no status may be in"


class PhaseLog:
    """Every (status, phase) a coordinator's models were in: at each transition (a listener
    is called synchronously, inside the transition) and wherever the test samples."""

    def __init__(self, coordinator: SwapCoordinator) -> None:
        self.coordinator = coordinator
        self.seen: set[tuple[ModelStatus, Phase]] = set()
        coordinator.events.add_listener(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.type == "status":
            self.sample(str(event.data["model"]))

    def sample(self, model_id: str) -> None:
        runtime = self.coordinator.runtime(model_id)
        self.seen.add((runtime.status, runtime.phase))


async def test_every_declared_phase_is_reached_and_no_other(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    """The table against use: a run through every sub-state the scheduler branches on."""
    coordinator = coordinator_factory(
        {"a": {}, "b": {}, "s": {"sleepy": True}}, max_concurrent_models=1, drain_timeout=60
    )
    log = PhaseLog(coordinator)
    # An operator's unload while the model loads: DRAINING from LOADING on.
    world.queue("a", Behaviour.GATED)
    loading = asyncio.create_task(coordinator.load("a"))
    await status_reached(coordinator, "a", _S.LOADING)
    unloading = asyncio.create_task(coordinator.unload("a"))
    await asyncio.sleep(0)  # one turn: the new task runs up to its wait (not a wait for time)
    assert coordinator.runtime("a").draining
    log.sample("a")
    world.gates["a"].set()
    await asyncio.gather(loading, unloading)
    # Serving, then chosen to make room for b while a request runs: EVICTING.
    lease = await coordinator.acquire("a")
    log.sample("a")
    want_b = asyncio.create_task(coordinator.acquire("b"))
    await until(coordinator, lambda: coordinator.runtime("a").eviction is not None, "a chosen")
    log.sample("a")
    lease.release()
    (await want_b).release()
    # A sleepy model goes to sleep to make room, then an unload stops it asleep.
    (await coordinator.acquire("s")).release()
    (await coordinator.acquire("b")).release()
    assert coordinator.model_status("s") == _S.SLEEPING
    await coordinator.unload("s")
    # A failed start.
    world.queue("a", Behaviour.FAIL_START)
    with pytest.raises(Exception, match="failed to load"):
        await coordinator.acquire("a")
    declared = {(status, phase) for status, phases in PHASES.items() for phase in phases}
    assert log.seen == declared


async def test_keep_alive_zero_unloads_once_the_last_request_ends(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory(default_ttl=0)  # the config alone never unloads
    lease = await coordinator.acquire("a")
    coordinator.keep_alive("a", 0)
    assert coordinator.runtime("a").idle_timer is None  # in flight: no idle clock
    assert coordinator.model_status("a") == _S.LOADED
    second = await coordinator.acquire("a")  # it still takes requests meanwhile
    lease.release()
    assert coordinator.model_status("a") == _S.LOADED  # one request still runs
    second.release()
    await status_reached(coordinator, "a", _S.UNLOADED)
    assert world.events == [("start", "a"), ("stop", "a")]


async def test_keep_alive_zero_on_an_idle_model_unloads_it_now(
    coordinator_factory: CoordinatorFactory,
) -> None:
    coordinator = coordinator_factory(default_ttl=0)
    (await coordinator.acquire("a")).release()
    coordinator.keep_alive("a", 0)
    await status_reached(coordinator, "a", _S.UNLOADED)
    # Until the model unloads: the next load is back on the configured ttl (never).
    (await coordinator.acquire("a")).release()
    assert coordinator.runtime("a").idle_timer is None


async def test_a_positive_keep_alive_is_the_idle_ttl_from_now_on(
    coordinator_factory: CoordinatorFactory,
) -> None:
    coordinator = coordinator_factory(default_ttl=0)
    (await coordinator.acquire("a")).release()
    assert coordinator.runtime("a").idle_timer is None
    assert coordinator.status().models["a"].idle_ttl is None  # default_ttl 0: never
    released = time.monotonic()
    coordinator.keep_alive("a", 0.2)
    assert coordinator.status().models["a"].idle_ttl == 0.2  # what /api/ps shows
    await status_reached(coordinator, "a", _S.UNLOADED)
    assert time.monotonic() - released >= 0.2


async def test_a_negative_keep_alive_never_unloads_when_idle_but_can_be_evicted(
    coordinator_factory: CoordinatorFactory,
) -> None:
    coordinator = coordinator_factory(default_ttl=0.05, max_concurrent_models=1)
    lease = await coordinator.acquire("a")
    coordinator.keep_alive("a", -1)
    lease.release()
    assert coordinator.runtime("a").idle_timer is None  # no idle clock: it stays
    (await coordinator.acquire("b")).release()  # one slot: a makes room all the same
    assert coordinator.model_status("a") == _S.UNLOADED


async def test_a_reload_puts_a_model_back_on_its_configured_ttl(
    coordinator_factory: CoordinatorFactory, world: FakeWorld
) -> None:
    coordinator = coordinator_factory(default_ttl=3600)
    (await coordinator.acquire("a")).release()
    coordinator.keep_alive("a", -1)
    assert coordinator.runtime("a").idle_timer is None
    same, _ = fake_config(world, swapper={"default_ttl": 3600})
    coordinator.reload(same)
    assert coordinator.runtime("a").idle_timer is not None


async def test_keep_alive_for_an_unknown_model_is_refused(
    coordinator_factory: CoordinatorFactory,
) -> None:
    with pytest.raises(ModelNotFound):
        coordinator_factory().keep_alive("zeta", 0)


async def test_concurrency_limit_queues_requests_beyond_it(
    coordinator_factory: CoordinatorFactory,
) -> None:
    coordinator = coordinator_factory({"a": {"concurrency_limit": 2}, "b": {}})
    first, second = await coordinator.acquire("a"), await coordinator.acquire("a")
    assert not coordinator.admits_now("a")
    third = asyncio.create_task(coordinator.acquire("a"))
    await until(coordinator, lambda: queued(coordinator, "a") == 1, "the third to queue")
    assert coordinator.runtime("a").in_flight == 2
    first.release()
    lease = await third  # admitted as soon as one ended
    assert coordinator.runtime("a").in_flight == 2
    for done in (second, lease):
        done.release()
    assert coordinator.admits_now("a")
    assert coordinator.admits_now("b") is False  # b is not resident: the limit is a's alone


async def test_concurrency_limit_with_a_full_queue_answers_queue_full(
    coordinator_factory: CoordinatorFactory,
) -> None:
    coordinator = coordinator_factory({"a": {"concurrency_limit": 1}}, max_queue=1)
    lease = await coordinator.acquire("a")
    waiting = asyncio.create_task(coordinator.acquire("a"))
    await until(coordinator, lambda: queued(coordinator, "a") == 1, "one to queue")
    with pytest.raises(QueueFull):
        coordinator.enqueue("a")
    lease.release()
    (await waiting).release()


@pytest.mark.parametrize("limit", [0, -1])
def test_a_concurrency_limit_below_one_is_a_config_error(world: FakeWorld, limit: int) -> None:
    with pytest.raises(ConfigError, match=r"models\.a\.concurrency_limit: must be an integer >= 1"):
        fake_config(world, {"a": {"concurrency_limit": limit}})
