"""The model documents of ``/api/*`` (tags, ps, show), from typed snapshots: no server."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from swapper.errors import ModelNotFound
from swapper.http.ollama.models import (
    ModelFile,
    ollama_name,
    ps_document,
    resolve_name,
    show_document,
    tags_document,
)
from swapper.scheduling.coordinator import SwapCoordinator
from swapper.scheduling.model_state import ModelStatus
from swapper.scheduling.snapshot import ModelSnapshot, Snapshot, VramSnapshot
from tests.conftest import fake_config
from tests.fakes import FakeWorld

NOW = 1_800_000_000.0


def model(status: ModelStatus, **fields: Any) -> ModelSnapshot:
    values: dict[str, Any] = {
        "status": status,
        "backend": "fake",
        "pid": None,
        "port": None,
        "loaded_at": NOW - 100,
        "last_error": None,
        "in_flight": 0,
        "queued": 0,
        "last_used": NOW - 10,
        "failures": 0,
        "retry_at": None,
        "vram_mb": 512.0,
        "predicted_vram_mb": 512.0,
        "pinned": False,
        **fields,
    }
    return ModelSnapshot(**values)


def snapshot(models: dict[str, ModelSnapshot]) -> Snapshot:
    vram = VramSnapshot(budget_mb=None, committed_mb=0.0, learned_mb={})
    return Snapshot(
        mode="multi-active",
        active_model=None,
        resident=[],
        max_concurrent_models=3,
        vram=vram,
        models=models,
        wall_time=NOW,
        monotonic_time=0.0,
    )


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def test_names_get_latest_unless_tagged() -> None:
    assert ollama_name("qwen") == "qwen:latest"
    assert ollama_name("qwen:8b") == "qwen:8b"


@pytest.mark.anyio
async def test_names_resolve_with_or_without_latest_and_by_alias() -> None:
    config, registry = fake_config(FakeWorld(), {"a": {"aliases": ["alpha"]}, "b:7b": {}})
    coordinator = SwapCoordinator(config, registry)
    try:
        assert resolve_name(coordinator, "a:latest") == "a"
        assert resolve_name(coordinator, "alpha:latest") == "a"
        assert resolve_name(coordinator, "b:7b") == "b:7b"
        with pytest.raises(ModelNotFound, match='model "b" not found'):
            resolve_name(coordinator, "b")
    finally:
        await coordinator.close()


def test_ps_lists_loaded_models_with_their_expiry() -> None:
    config, _ = fake_config(FakeWorld(), {m: {} for m in "abcde"})
    files = {m: ModelFile(None, 0, 0.0, None) for m in config.models}
    snap = snapshot(
        {
            "a": model(ModelStatus.LOADED, idle_ttl=60.0),
            "b": model(ModelStatus.LOADED, idle_ttl=None),  # never unloads when idle
            "c": model(ModelStatus.UNLOADED, idle_ttl=60.0),
            "d": model(ModelStatus.LOADED, in_flight=1, idle_ttl=60.0),  # busy: no clock yet
            # A client's keep_alive of 5 minutes, in the snapshot's idle_ttl like a ttl.
            "e": model(ModelStatus.LOADED, idle_ttl=300.0),
        }
    )
    document = ps_document(config, snap, files, {"a": 1000.0})
    rows = {row["model"]: row for row in document["models"]}
    assert set(rows) == {"a:latest", "b:latest", "d:latest", "e:latest"}
    assert rows["a:latest"]["expires_at"] == iso(NOW - 10 + 60)  # last used + ttl
    assert rows["e:latest"]["expires_at"] == iso(NOW - 10 + 300)
    assert rows["a:latest"]["size_vram"] == 1000 * 1024 * 1024  # NVML's figure wins
    assert rows["b:latest"]["size_vram"] == 512 * 1024 * 1024  # else the backend's own
    assert rows["b:latest"]["expires_at"].startswith("2318")
    assert rows["d:latest"]["expires_at"].startswith("2318")


def test_models_without_a_gguf_file_have_empty_details() -> None:
    config, _ = fake_config(FakeWorld(), {"a": {}})
    files = {"a": ModelFile(None, 0, 0.0, None)}
    row = tags_document(config, files)["models"][0]
    assert row["name"] == row["model"] == "a:latest"
    assert row["details"]["format"] == "" and row["size"] == 0
    shown = show_document(config.models["a"], files["a"])
    assert shown["model_info"] == {} and shown["template"] == ""
    assert shown["capabilities"] == ["completion"]
