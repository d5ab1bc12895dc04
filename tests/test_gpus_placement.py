"""Several GPUs, the review's cases: a model's own multi-GPU args, models of unknown size, GPUs of
different sizes, per-GPU estimates (vLLM's), remote models, budgets above a GPU's total, and an
entry's own ``CUDA_VISIBLE_DEVICES`` naming no GPU. In process, on a fake GPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from swapper.errors import ConfigError, ModelUnavailable
from swapper.scheduling.coordinator import SwapCoordinator
from tests.conftest import fake_config
from tests.fakes import Behaviour, FakeGpu, FakeWorld, until
from tests.test_gpus import placed, use

pytestmark = pytest.mark.anyio

Make = Callable[..., SwapCoordinator]
GPU_MB = 16384.0


@pytest.fixture
async def make(world: FakeWorld, tmp_path: Path) -> AsyncIterator[Make]:
    """Coordinators in multi-active mode (3 slots, no reserve) on a fake GPU of ``devices`` x
    16 GiB, or of ``sizes``."""
    made: list[SwapCoordinator] = []

    def factory(
        models: dict[str, dict[str, Any]],
        *,
        devices: int = 2,
        sizes: list[float] | None = None,
        extra_mb: float = 0.0,
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
        gpu = FakeGpu(world, GPU_MB, devices=devices, sizes=sizes, extra_mb=extra_mb)
        made.append(SwapCoordinator(config, registry, gpu))
        return made[-1]

    yield factory
    for coordinator in made:
        await coordinator.close()
    assert world.alive == set(), "a fake backend outlived the coordinator"


async def refused(coordinator: SwapCoordinator, model_id: str) -> str:
    with pytest.raises(ModelUnavailable) as info:
        await coordinator.acquire(model_id)
    return info.value.message


# -- a model's own multi-GPU args ------------------------------------------------------------


async def test_auto_gives_a_model_as_many_gpus_as_its_args_declare(
    make: Make, world: FakeWorld
) -> None:
    # Small enough for one GPU, but its args (a tensor-parallel size of 2) use two.
    coordinator = make({"tp": {"vram_mb": 4000, "declares_gpus": 2}})
    await use(coordinator, "tp")
    assert placed(coordinator) == {"tp": [0, 1]}
    assert world.visible["tp"] == "0,1"


async def test_declared_gpus_pick_the_emptiest_set_of_that_width(make: Make) -> None:
    coordinator = make(
        {"a": {"vram_mb": 8000}, "tp": {"vram_mb": 4000, "declares_gpus": 2}}, devices=3
    )
    await use(coordinator, "a")
    await use(coordinator, "tp")
    assert placed(coordinator) == {"a": [0], "tp": [1, 2]}


async def test_a_pin_shorter_than_the_declared_gpus_is_refused(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make({"tp": {"vram_mb": 4000, "declares_gpus": 2, "gpus": [1]}})
    message = await refused(coordinator, "tp")
    assert "placed on 1 GPU(s) [1], but its args make it use 2" in message, message
    assert world.starts("tp") == 0


async def test_more_declared_gpus_than_the_node_has_is_refused(make: Make) -> None:
    coordinator = make({"tp": {"vram_mb": 4000, "declares_gpus": 4}})
    message = await refused(coordinator, "tp")
    assert "uses 4 GPUs (its args say so), but swapper sees only 2" in message, message


async def test_args_that_pick_devices_themselves_get_every_gpu(
    make: Make, world: FakeWorld
) -> None:
    # llama.cpp's --device / --main-gpu name CUDA's indexes: narrowing the GPUs would break them.
    coordinator = make({"dev": {"vram_mb": 4000, "declares_gpus": 0}})
    await use(coordinator, "dev")
    assert placed(coordinator) == {"dev": [0, 1]}
    assert world.visible["dev"] == "0,1"


# -- models of unknown size ------------------------------------------------------------------


async def test_a_model_of_unknown_size_is_placed_by_its_files_size(
    make: Make, world: FakeWorld
) -> None:
    # 20000 MiB of files on 16 GiB GPUs: no single GPU holds it, so it is split.
    coordinator = make({"gguf": {"file_mb": 20000}})
    await use(coordinator, "gguf")
    assert placed(coordinator) == {"gguf": [0, 1]}
    assert coordinator.status().models["gguf"].predicted_vram_mb == 20000


async def test_without_nvml_a_files_size_is_not_used(world: FakeWorld, tmp_path: Path) -> None:
    config, registry = fake_config(
        world,
        {"gguf": {"file_mb": 20000}},
        swapper={"vram_budget_mb": 8000, "state_file": str(tmp_path / "s.json")},
    )
    coordinator = SwapCoordinator(config, registry, None)
    try:
        await use(coordinator, "gguf")  # unknown size (0) as before: it loads
        assert coordinator.status().models["gguf"].predicted_vram_mb == 0
    finally:
        await coordinator.close()


async def test_concurrent_loads_of_unknown_size_spread_over_the_gpus(
    make: Make, world: FakeWorld
) -> None:
    coordinator = make({"u1": {"actual_mb": 12000}, "u2": {"actual_mb": 12000}})
    world.queue("u1", Behaviour.GATED)
    world.queue("u2", Behaviour.GATED)
    first = asyncio.create_task(coordinator.acquire("u1"))
    second = asyncio.create_task(coordinator.acquire("u2"))
    statuses = coordinator.status
    await until(
        coordinator,
        lambda: all(m.status.value == "LOADING" for m in statuses().models.values()),
        "both loading",
    )
    # Both of unknown size (charged nothing): the second goes where fewer models are.
    assert placed(coordinator) == {"u1": [0], "u2": [1]}
    world.gates["u1"].set()
    world.gates["u2"].set()
    for task in (first, second):
        (await task).release()


# -- GPUs of different sizes; a backend's per-GPU estimate (vLLM's) ------------------------

SIZES = [24576.0, 12288.0]


async def test_an_estimate_is_taken_from_the_gpu_it_goes_on(make: Make) -> None:
    # 0.9 of GPU 1 (12 GiB), not of the largest GPU: it fits its own GPU's budget.
    coordinator = make({"small": {"reserve_share": 0.9, "gpus": [1]}}, sizes=SIZES)
    model = coordinator.runtime("small")
    assert coordinator.placement.start_need_mb(model) == pytest.approx(0.9 * 12288)
    await use(coordinator, "small")
    gpus = coordinator.status().vram.gpus
    assert [g.committed_mb for g in gpus] == [0, pytest.approx(0.9 * 12288)]


async def test_an_estimate_only_model_is_never_split_to_fit(make: Make, world: FakeWorld) -> None:
    # Each reserves 0.6 of its GPU: the third cannot fit beside either, and splitting it would
    # not lower what it reserves on each GPU, so one of the others makes room.
    reserves = {"a": 0.6 * SIZES[0], "b": 0.6 * SIZES[1], "c": 0.6 * SIZES[0]}
    coordinator = make(
        {m: {"reserve_share": 0.6, "actual_mb": mb} for m, mb in reserves.items()}, sizes=SIZES
    )
    await use(coordinator, "a")
    await use(coordinator, "b")
    assert placed(coordinator) == {"a": [0], "b": [1], "c": None}
    await use(coordinator, "c")  # a, used longest ago, makes room on its GPU
    assert placed(coordinator)["c"] == [0]
    assert {m: s.status.value for m, s in coordinator.status().models.items()} == {
        "a": "UNLOADED",
        "b": "LOADED",
        "c": "LOADED",
    }
    assert ("stop", "b") not in world.events


async def test_an_estimate_larger_than_every_gpu_is_refused_naming_each(make: Make) -> None:
    coordinator = make({"greedy": {"reserve_share": 0.99}}, sizes=SIZES, vram_reserve_mb=512)
    message = await refused(coordinator, "greedy")
    assert "on GPU 0" in message and "on GPU 1" in message, message
    assert "not split over several GPUs" in message, message


async def test_a_refusal_names_the_gpu_whose_budget_is_too_small(make: Make) -> None:
    # 18000 MiB fits the two budgets together (20000), but not evenly: GPU 1's 4000 is short.
    coordinator = make({"big": {"vram_mb": 18000}}, vram_budget_mb={0: 16000, 1: 4000})
    message = await refused(coordinator, "big")
    assert "9000 MiB on each, more than the budget of GPU(s) [1] (4000 MiB)" in message, message


# -- remote models, budgets above a GPU's total ---------------------------------------------


async def test_a_model_on_no_local_gpu_is_charged_on_none(make: Make, world: FakeWorld) -> None:
    coordinator = make({"remote": {"remote": True, "vram_mb": 30000}, "a": {"vram_mb": 15000}})
    await use(coordinator, "remote")
    await use(coordinator, "a")
    status = coordinator.status()
    assert placed(coordinator) == {"remote": None, "a": [0]}
    assert all("remote" not in g.models for g in status.vram.gpus)
    assert [g.committed_mb for g in status.vram.gpus] == [15000, 0]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"backend": "openai", "url": "http://10.0.0.5:8000", "gpus": [0]},
            "gpus: a remote server (backend: openai) uses no GPU of this node",
        ),
        ({"backend": "ollama", "model": "qwen3:8b", "gpus": [1]}, "gpus: needs serve: true"),
    ],
)
def test_gpus_on_a_backend_without_a_local_gpu_is_a_config_error(
    world: FakeWorld, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        fake_config(world, {"m": entry})
    assert message in str(info.value) and "$.models.m" in str(info.value), str(info.value)


async def test_a_scalar_budget_above_a_gpus_total_is_capped_with_a_warning(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "swapper.placement")
    coordinator = make({"a": {"vram_mb": 20000}}, vram_budget_mb=32768)
    assert [g.budget_mb for g in coordinator.status().vram.gpus] == [GPU_MB, GPU_MB]
    warned = [r.message for r in caplog.records if "vram_budget_mb" in r.message]
    assert len(warned) == 1 and "per GPU now" in warned[0], warned
    assert placed(coordinator)["a"] is None
    await use(coordinator, "a")  # 20000 on one 16 GiB GPU would over-commit it: split
    assert placed(coordinator)["a"] == [0, 1]


async def test_budget_map_keys_naming_no_gpu_are_warned_about(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "swapper.placement")
    make({"a": {}}, vram_budget_mb={0: 8000, 5: 8000}, vram_reserve_mb={7: 100})
    warned = [r.message for r in caplog.records]
    assert any("vram_budget_mb names GPU(s) [5]" in m for m in warned), warned
    assert any("vram_reserve_mb names GPU(s) [7]" in m for m in warned), warned


# -- an entry's own CUDA_VISIBLE_DEVICES -----------------------------------------------------


@pytest.mark.parametrize("setting", ["5", "0,7", "MIG-4f1c2a", "GPU-nonexistent"])
async def test_an_entrys_cuda_visible_devices_naming_no_gpu_is_refused(
    make: Make, world: FakeWorld, setting: str
) -> None:
    coordinator = make({"pin": {"vram_mb": 2000, "env": {"CUDA_VISIBLE_DEVICES": setting}}})
    message = await refused(coordinator, "pin")
    assert f"CUDA_VISIBLE_DEVICES={setting!r}" in message and "names none" in message, message
    assert world.starts("pin") == 0


@pytest.mark.parametrize("setting", ["-1", ""])
async def test_an_entrys_explicit_no_gpu_runs_on_none_and_holds_nothing(
    make: Make, world: FakeWorld, setting: str
) -> None:
    coordinator = make({"cpu": {"vram_mb": 2000, "env": {"CUDA_VISIBLE_DEVICES": setting}}})
    await use(coordinator, "cpu")
    assert placed(coordinator) == {"cpu": None}
    assert all(g.committed_mb == 0 and g.used_mb == 0 for g in coordinator.status().vram.gpus)
    assert world.held == {}


async def test_an_entrys_pin_is_read_in_pci_bus_order_unless_it_says_otherwise(
    make: Make,
) -> None:
    coordinator = make(
        {
            "pin": {"env": {"CUDA_VISIBLE_DEVICES": "1"}},
            "own": {"env": {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}},
            "order": {"env": {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}},
        }
    )
    for model_id in ("pin", "own", "order"):
        coordinator.runtime(model_id).backend.gpus = [1]
    env = {m: coordinator.runtime(m).backend.gpu_environment() for m in ("pin", "own", "order")}
    assert env["pin"] == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert env["own"] == {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    # swapper's own choice of GPUs is in NVML's order: its CUDA_DEVICE_ORDER wins the entry's.
    assert env["order"] == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


# -- the wait for freed memory ---------------------------------------------------------------


async def test_a_wait_that_gives_up_keeps_the_releases_other_models_noted_meanwhile(
    make: Make,
) -> None:
    # Other programs hold 8000 MiB of each GPU: w never sees its 10000 free and gives up.
    coordinator = make(
        {"w": {"gpus": [1]}, "b": {"vram_mb": 2000, "gpus": [1]}},
        extra_mb=8000,
        vram_release_timeout=0.3,
    )
    await use(coordinator, "b")
    placement = coordinator.placement
    waiting, b = coordinator.runtime("w"), coordinator.runtime("b")
    waiting.gpus = (1,)
    read = placement.read_gpus
    longer = msgspec.structs.replace(
        placement.config,
        swapper=msgspec.structs.replace(placement.config.swapper, vram_release_timeout=30),
    )

    async def read_and_note_b() -> Any:
        # While w waits, b is unloaded (its release outlives w's wait).
        if not placement.releases.pending(1):
            placement.config = longer
            placement.expect_release(b, {1: 10000.0}, 2000.0)
        return await read()

    placement.read_gpus = read_and_note_b  # type: ignore[method-assign]
    await placement.wait_for_memory(waiting, 10000)  # gives up after 0.3 s
    # b's release still holds up the next load onto GPU 1: w's giving up is not NVML's word.
    assert placement.releases.pending(1) == ["b"]
