"""Learned sizes where NVML cannot tell swapper's processes apart (a container without
``pid: host``): the change in the GPU's used memory across a load is the model's size, but
only when no other backend started, stopped, slept or woke meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from swapper.scheduling.coordinator import ModelStatus, SwapCoordinator
from tests.conftest import fake_config
from tests.fakes import Behaviour, FakeGpu, FakeWorld, finished

pytestmark = pytest.mark.anyio


async def use(coordinator: SwapCoordinator, model_id: str) -> None:
    """One request to ``model_id``, start to end."""
    (await coordinator.acquire(model_id)).release()


async def test_a_size_comes_from_used_memory_only_when_nothing_else_moved(
    world: FakeWorld,
    tmp_path: Path,
) -> None:
    config, registry = fake_config(
        world,
        {"a": {"vram_mb": 1000, "actual_mb": 4000}, "b": {"vram_mb": 1000, "actual_mb": 3000}},
        swapper={
            "mode": "multi-active",
            "max_concurrent_models": 2,
            "vram_reserve_mb": 0,
            "state_file": str(tmp_path / "state.json"),
        },
    )
    coordinator = SwapCoordinator(config, registry, FakeGpu(world, host_pids=True))
    try:
        world.queue("b", Behaviour.GATED)
        want_b = asyncio.create_task(coordinator.acquire("b"))
        await coordinator.wait_for_status("b", ModelStatus.LOADING)
        # b's process holds its memory from its start on (no coordinator event marks it: poll).
        async with asyncio.timeout(30):
            while "b" not in world.alive:
                await asyncio.sleep(0.01)
        await use(coordinator, "a")  # a starts, and is measured, while b still loads
        await finished(coordinator, "measure:a")
        world.gates["b"].set()
        (await want_b).release()
        await finished(coordinator, "measure:b")
        # a's start moved the used memory while b loaded: b's difference (7000) is not b's.
        assert coordinator.status().vram.learned_mb == {"a": 4000}
        await coordinator.unload("b")
        await use(coordinator, "b")  # alone this time
        await finished(coordinator, "measure:b")
        assert coordinator.status().vram.learned_mb == {"a": 4000, "b": 3000}
    finally:
        await coordinator.close()
