"""Several GPUs on one node, in process: placement per GPU on a fake GPU of two devices.

Auto placement (one GPU, the one with the most free budget; a split only when no single GPU
can hold the model), pinning (``gpus:`` and an operator's own ``CUDA_VISIBLE_DEVICES``), per-GPU
eviction, the wait for freed memory on the right GPU, the per-GPU status section and the
settings that apply per GPU.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from swapper.errors import ConfigError, ModelUnavailable
from swapper.scheduling.coordinator import SwapCoordinator
from tests.conftest import fake_config
from tests.fakes import FakeGpu, FakeWorld, until

pytestmark = pytest.mark.anyio

Make = Callable[..., SwapCoordinator]
GPU_MB = 16384.0


@pytest.fixture
async def make(world: FakeWorld, tmp_path: Path) -> AsyncIterator[Make]:
    """Coordinators in multi-active mode (3 slots) on a fake GPU of ``devices`` x 16 GiB."""
    made: list[SwapCoordinator] = []

    def factory(
        models: dict[str, dict[str, Any]],
        *,
        devices: int = 2,
        release_lag: float | None = None,
        **swapper: Any,
    ) -> SwapCoordinator:
        settings = {
            "mode": "multi-active",
            "max_concurrent_models": 3,
            "vram_reserve_mb": 0,
            "state_file": str(tmp_path / "state.json"),
            **swapper,
        }
        config, registry = fake_config(world, models, swapper=settings)
        gpu = FakeGpu(world, GPU_MB, devices=devices, release_lag=release_lag)
        made.append(SwapCoordinator(config, registry, gpu))
        return made[-1]

    yield factory
    for coordinator in made:
        await coordinator.close()
    assert world.alive == set(), "a fake backend outlived the coordinator"


async def use(coordinator: SwapCoordinator, model_id: str) -> None:
    lease = await coordinator.acquire(model_id)
    lease.release()


def placed(coordinator: SwapCoordinator) -> dict[str, list[int] | None]:
    """Each model's GPUs as the status snapshot shows them."""
    return {mid: m.gpus for mid, m in coordinator.status().models.items()}


def statuses(coordinator: SwapCoordinator) -> dict[str, str]:
    return {mid: m.status.value for mid, m in coordinator.status().models.items()}


async def test_auto_places_each_model_on_the_gpu_with_the_most_free_budget(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make({"a": {"vram_mb": 6000}, "b": {"vram_mb": 4000}, "c": {"vram_mb": 3000}})
    await use(coordinator, "a")  # both empty: the first GPU
    await use(coordinator, "b")  # 10384 free on GPU 0, 16384 on GPU 1
    await use(coordinator, "c")  # 10384 on GPU 0, 12384 on GPU 1
    assert placed(coordinator) == {"a": [0], "b": [1], "c": [1]}
    assert world.visible == {"a": "0", "b": "1", "c": "1"}
    gpus = coordinator.status().vram.gpus
    assert [(g.index, g.budget_mb, g.committed_mb, g.models) for g in gpus] == [
        (0, GPU_MB, 6000, ["a"]),
        (1, GPU_MB, 7000, ["b", "c"]),
    ]
    assert [(g.name, g.total_mb) for g in gpus] == [("Fake GPU", GPU_MB), ("Fake GPU #1", GPU_MB)]


async def test_auto_does_not_split_a_model_one_gpu_can_hold(make: Make, world: FakeWorld) -> None:
    # 12000 MiB: not on GPU 0 beside a (6000 of 16384), but whole on GPU 1, never split.
    coordinator = make({"a": {"vram_mb": 6000}, "big": {"vram_mb": 12000}})
    await use(coordinator, "a")
    await use(coordinator, "big")
    assert placed(coordinator) == {"a": [0], "big": [1]}
    assert world.visible["big"] == "1"


async def test_auto_splits_evenly_only_a_model_no_single_gpu_can_hold(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make({"huge": {"vram_mb": 20000}})
    await use(coordinator, "huge")
    assert placed(coordinator) == {"huge": [0, 1]}
    assert world.visible["huge"] == "0,1"
    assert [g.committed_mb for g in coordinator.status().vram.gpus] == [10000, 10000]


async def test_a_split_uses_the_fewest_gpus_those_with_the_most_room(
    make: Make, world: FakeWorld
) -> None:
    # Three GPUs; a holds 8000 on GPU 0. 20000 needs two GPUs: the two empty ones, not all three.
    coordinator = make({"a": {"vram_mb": 8000}, "huge": {"vram_mb": 20000}}, devices=3)
    await use(coordinator, "a")
    await use(coordinator, "huge")
    assert placed(coordinator) == {"a": [0], "huge": [1, 2]}
    assert world.visible["huge"] == "1,2"
    assert statuses(coordinator) == {"a": "LOADED", "huge": "LOADED"}


async def test_a_model_larger_than_every_gpu_together_is_refused(make: Make) -> None:
    coordinator = make({"giant": {"vram_mb": 40000}})
    with pytest.raises(ModelUnavailable) as info:
        await coordinator.acquire("giant")
    message = info.value.message
    assert "40000 MiB" in message and "20000 MiB on each" in message, message
    assert "budget of GPU(s) [0, 1] (16384, 16384 MiB)" in message, message


async def test_a_pinned_model_goes_on_its_gpu_even_when_another_has_more_room(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make({"a": {"vram_mb": 6000}, "p": {"vram_mb": 2000, "gpus": [0]}})
    await use(coordinator, "a")
    await use(coordinator, "p")
    assert placed(coordinator) == {"a": [0], "p": [0]}
    assert world.visible["p"] == "0"


async def test_a_pin_to_a_gpu_nvml_does_not_show_is_refused_with_the_gpus_named(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make({"p": {"vram_mb": 2000, "gpus": [0, 3]}})
    with pytest.raises(ModelUnavailable) as info:
        await coordinator.acquire("p")
    message = info.value.message
    assert "GPU(s) [3]" in message and "[0, 1]" in message and "gpus" in message
    assert world.starts("p") == 0


async def test_a_pinned_share_larger_than_its_gpus_budget_is_refused(make: Make) -> None:
    coordinator = make({"p": {"vram_mb": 20000, "gpus": [1]}})
    with pytest.raises(ModelUnavailable) as info:
        await coordinator.acquire("p")
    assert "GPU(s) [1]" in info.value.message and "20000 MiB" in info.value.message


async def test_an_operators_own_cuda_visible_devices_is_a_pin_and_wins(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {
            "a": {"vram_mb": 6000},
            "own": {"vram_mb": 2000, "gpus": [0], "env": {"CUDA_VISIBLE_DEVICES": "GPU-fake-1"}},
        }
    )
    await use(coordinator, "a")
    await use(coordinator, "own")
    assert placed(coordinator)["own"] == [1]  # its env names GPU 1 (by UUID): that wins
    assert world.visible["own"] is None  # swapper set nothing: the entry's env goes as it is


async def test_eviction_is_per_gpu_a_model_on_the_other_gpu_survives(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {
            "a": {"vram_mb": 10000, "gpus": [0]},
            "b": {"vram_mb": 10000, "gpus": [1]},
            "c": {"vram_mb": 10000, "gpus": [0]},
        }
    )
    await use(coordinator, "b")  # b, on GPU 1, is the least recently used
    await use(coordinator, "a")
    await use(coordinator, "c")
    assert statuses(coordinator) == {"a": "UNLOADED", "b": "LOADED", "c": "LOADED"}
    assert ("stop", "b") not in world.events


async def test_auto_evicts_where_it_is_cheapest(make: Make, world: FakeWorld) -> None:
    # Neither GPU has room for c; b (GPU 1) was used longest ago, so c goes there.
    coordinator = make({"a": {"vram_mb": 10000}, "b": {"vram_mb": 10000}, "c": {"vram_mb": 10000}})
    await use(coordinator, "a")
    await use(coordinator, "b")
    await use(coordinator, "a")  # a used again: b is now the least recently used
    await use(coordinator, "c")
    assert statuses(coordinator) == {"a": "LOADED", "b": "UNLOADED", "c": "LOADED"}
    assert placed(coordinator)["c"] == [1]


async def test_the_freed_memory_wait_reads_the_gpu_the_load_goes_on(
    make: Make, world: FakeWorld, caplog: pytest.LogCaptureFixture
) -> None:
    # A stopped model's memory shows free only after the lag, on its own GPU (1).
    coordinator = make(
        {
            "a": {"vram_mb": 10000, "gpus": [1]},
            "on0": {"vram_mb": 10000, "gpus": [0]},
            "on1": {"vram_mb": 10000, "gpus": [1]},
        },
        release_lag=0.5,
        vram_release_timeout=10,
    )
    await use(coordinator, "a")
    caplog.set_level(logging.INFO, "swapper.placement")
    await coordinator.unload("a")
    await use(coordinator, "on0")  # GPU 0 is free: no wait for a's release on GPU 1
    assert not [r for r in caplog.records if r.message.startswith("on0: wait")]
    await use(coordinator, "on1")  # on GPU 1 it waits for a's memory to show free
    waited = [r.message for r in caplog.records if r.message.startswith("on1: wait")]
    assert waited and "still waiting for a to release" in waited[0], waited
    assert any(m.startswith("on1: waited") for m in waited)


async def test_budgets_and_reserves_apply_per_gpu_as_maps(make: Make, world: FakeWorld) -> None:
    coordinator = make(
        {"a": {"vram_mb": 9000}, "b": {"vram_mb": 9000}},
        vram_budget_mb={0: 8000},  # GPU 1: its total less its reserve
        vram_reserve_mb={1: 1384},
    )
    assert [g.budget_mb for g in coordinator.status().vram.gpus] == [8000, 15000]
    await use(coordinator, "a")
    assert placed(coordinator)["a"] == [1]  # GPU 0's budget cannot hold 9000
    await use(coordinator, "b")  # GPU 1 is full now, GPU 0 too small: a makes room
    assert statuses(coordinator) == {"a": "UNLOADED", "b": "LOADED"}
    await until(coordinator, lambda: placed(coordinator)["b"] == [1], "b on GPU 1")


async def test_a_budget_map_without_nvml_places_on_the_gpus_it_names(
    world: FakeWorld, tmp_path: Path
) -> None:
    config, registry = fake_config(
        world,
        {"a": {"vram_mb": 7000}, "b": {"vram_mb": 7000}},
        swapper={
            "mode": "multi-active",
            "max_concurrent_models": 2,
            "vram_budget_mb": {0: 8000, 1: 8000},
            "state_file": str(tmp_path / "state.json"),
        },
    )
    coordinator = SwapCoordinator(config, registry, None)
    try:
        await use(coordinator, "a")
        await use(coordinator, "b")
        assert placed(coordinator) == {"a": [0], "b": [1]}
        assert world.visible == {"a": "0", "b": "1"}
    finally:
        await coordinator.close()


async def test_without_a_gpu_a_scalar_budget_is_one_budget_and_no_gpu_is_set(
    world: FakeWorld, tmp_path: Path
) -> None:
    config, registry = fake_config(
        world,
        {"a": {"vram_mb": 5000}, "b": {"vram_mb": 5000, "gpus": [3]}},
        swapper={
            "mode": "multi-active",
            "max_concurrent_models": 2,
            "vram_budget_mb": 8000,
            "state_file": str(tmp_path / "state.json"),
        },
    )
    coordinator = SwapCoordinator(config, registry, None)
    try:
        await use(coordinator, "a")
        await use(coordinator, "b")  # one 8000 budget: a makes room
        assert statuses(coordinator) == {"a": "UNLOADED", "b": "LOADED"}
        assert placed(coordinator) == {"a": None, "b": None}
        assert coordinator.status().vram.gpus == []
        assert world.visible == {"a": None, "b": None}
    finally:
        await coordinator.close()


@pytest.mark.parametrize(
    ("swapper", "model", "message"),
    [
        ({"vram_budget_mb": {0: 18000, 1: -5}}, {}, "$.swapper: vram_budget_mb.1: must be"),
        ({"vram_budget_mb": {-1: 18000}}, {}, "vram_budget_mb.-1: a GPU index must be >= 0"),
        ({"vram_reserve_mb": {2: float("nan")}}, {}, "vram_reserve_mb.2: must be a number >= 0"),
        ({}, {"gpus": []}, "$.models.m.gpus: must list at least one GPU"),
        ({}, {"gpus": [0, 0]}, "$.models.m.gpus[1]: GPU 0 is listed twice"),
        ({}, {"gpus": [-1]}, "$.models.m.gpus[0]: a GPU index must be >= 0"),
        ({}, {"gpus": "all"}, "$.models.m.gpus"),
    ],
)
def test_per_gpu_settings_are_validated_with_the_key_named(
    world: FakeWorld, swapper: dict[str, Any], model: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        fake_config(world, {"m": model}, swapper=swapper)
    assert message in str(info.value), str(info.value)


async def test_a_sleeping_model_wakes_on_its_own_gpu(make: Make, world: FakeWorld) -> None:
    coordinator = make({"s": {"vram_mb": 10000, "sleepy": True}, "b": {"vram_mb": 4000}})
    await use(coordinator, "s")
    await coordinator.unload("s")  # asleep on GPU 0: it holds 100 MiB there
    await use(coordinator, "b")  # GPU 1 has more room now: b goes there
    await use(coordinator, "s")  # woken where its memory is, not started elsewhere
    assert placed(coordinator) == {"s": [0], "b": [1]}
    assert world.starts("s") == 1 and ("wake", "s") in world.events


async def test_a_sleeper_that_would_evict_a_busy_model_starts_cold_on_a_free_gpu(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make(
        {
            "s": {"vram_mb": 10000, "sleepy": True},
            "x": {"vram_mb": 12000},
            "y": {"vram_mb": 12000},
        }
    )
    await use(coordinator, "s")  # GPU 0
    await use(coordinator, "x")  # GPU 1
    await coordinator.unload("s")  # asleep on GPU 0
    busy = await coordinator.acquire("y")  # GPU 0 (16284 MiB free there), and kept busy
    await coordinator.unload("x")  # GPU 1 is empty now
    assert placed(coordinator)["y"] == [0]
    # Waking s on GPU 0 would cut y off; GPU 1 has room now: s is stopped and started there.
    await use(coordinator, "s")
    assert placed(coordinator)["s"] == [1]
    assert statuses(coordinator)["y"] == "LOADED" and ("stop", "y") not in world.events
    assert ("wake", "s") not in world.events and world.starts("s") == 2
    busy.release()
