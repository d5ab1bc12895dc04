"""The /status document: its keys and formats pinned, built at the edge from a typed snapshot;
and NVML read off the event loop, so a slow driver never stalls other requests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import swapper.http.app
from swapper.gpu import GpuStats
from swapper.http.admin import _event_stream, status_document
from swapper.scheduling.model_state import ModelStatus
from swapper.scheduling.snapshot import ModelSnapshot, Snapshot, VramSnapshot
from tests.conftest import FakeApp, fake_config, served_in_thread
from tests.fakes import FakeGpu, FakeWorld
from tests.gpu_snapshots import TWO_GPU_NVML, two_gpu_snapshot

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+00:00$")
TOP_KEYS = {"mode", "active_model", "resident", "max_concurrent_models", "vram", "models", "gpu"}
#: The model fields of /status, in the order the document writes them.
MODEL_FIELDS = [
    "status",
    "backend",
    "pid",
    "port",
    "loaded_at",
    "last_error",
    "in_flight",
    "queued",
    "last_used",
    "failures",
    "retry_at",
    "vram_mb",
    "predicted_vram_mb",
    "pinned",
    "gpus",
]
MODEL_KEYS = set(MODEL_FIELDS)
# Generous: only reached when the read blocks the loop (the test then fails, it does not hang).
GATE_TIMEOUT = 20.0


def _model(**raw: Any) -> ModelSnapshot:
    fields: dict[str, Any] = {
        "status": ModelStatus.UNLOADED,
        "backend": "fake",
        "pid": None,
        "port": None,
        "loaded_at": None,
        "last_error": None,
        "in_flight": 0,
        "queued": 0,
        "last_used": None,
        "failures": 0,
        "retry_at": None,
        "vram_mb": None,
        "predicted_vram_mb": 0.0,
        "pinned": False,
    }
    return ModelSnapshot(**{**fields, **raw})


def test_the_document_formats_raw_values_exactly() -> None:
    snapshot = Snapshot(
        mode="multi",
        active_model="a",
        resident=["a"],
        max_concurrent_models=2,
        vram=VramSnapshot(budget_mb=15871.96, committed_mb=1234.5678, learned_mb={"a": 1234.5}),
        models={
            "a": _model(
                status=ModelStatus.LOADED,
                pid=4242,
                port=41000,
                loaded_at=1_700_000_000.123456,
                in_flight=2,
                queued=1,
                last_used=1_700_000_100.9999,
                vram_mb=1200.04,
                predicted_vram_mb=1234.5678,
                pinned=True,
            ),
            "b": _model(
                status=ModelStatus.FAILED,
                last_error="it broke",
                failures=2,
                retry_at=1000.0 + 60.25,
                vram_mb=1.0,
            ),
        },
        wall_time=1_700_000_200.0,
        monotonic_time=1000.0,
    )
    gpus = [GpuStats(0, "Fake GPU", 16383.6, 1300.4, 15083.2)]
    doc = status_document(snapshot, gpus, {"a": 1100.06})
    assert doc == {
        "mode": "multi",
        "active_model": "a",
        "resident": ["a"],
        "max_concurrent_models": 2,
        "vram": {
            "budget_mb": 15872.0,
            "committed_mb": 1234.6,
            "learned_mb": {"a": 1234.5},
            "gpus": [],  # no per-GPU accounting: one budget
        },
        "models": {
            "a": {
                "status": "LOADED",
                "backend": "fake",
                "pid": 4242,
                "port": 41000,
                "loaded_at": "2023-11-14T22:13:20.123+00:00",
                "last_error": None,
                "in_flight": 2,
                "queued": 1,
                "last_used": "2023-11-14T22:15:00.999+00:00",
                "failures": 0,
                "retry_at": None,
                "vram_mb": 1100.1,  # NVML's measurement wins over the recorded figure
                "predicted_vram_mb": 1234.6,
                "pinned": True,
                "gpus": None,
            },
            "b": {
                "status": "FAILED",
                "backend": "fake",
                "pid": None,
                "port": None,
                "loaded_at": None,
                "last_error": "it broke",
                "in_flight": 0,
                "queued": 0,
                "last_used": None,
                "failures": 2,
                "retry_at": "2023-11-14T22:17:40.250+00:00",  # monotonic, made wall time
                "vram_mb": 1.0,  # no measurement: the recorded figure
                "predicted_vram_mb": 0.0,
                "pinned": False,
                "gpus": None,
            },
        },
        "gpu": {
            "available": True,
            "gpus": [
                {
                    "index": 0,
                    "name": "Fake GPU",
                    "total_mb": 16384,
                    "used_mb": 1300,
                    "free_mb": 15083,
                }
            ],
        },
    }
    # Key order is part of what clients see (a diff of two documents, jq's output).
    assert list(doc) == [
        "mode",
        "active_model",
        "resident",
        "max_concurrent_models",
        "vram",
        "models",
        "gpu",
    ]
    assert list(doc["models"]["a"]) == MODEL_FIELDS
    assert status_document(snapshot, [], {})["gpu"] == {"available": False, "gpus": []}


async def _first_event(client: Any) -> dict[str, Any]:
    """The first event of /events, from its generator (the test client buffers whole bodies)."""
    stream = _event_stream(client.app.state)
    try:
        chunk = await anext(stream)
    finally:
        await stream.aclose()
    kind, data = chunk.decode().split("\n")[:2]
    assert kind == "event: snapshot"
    return json.loads(data[len("data: ") :])  # type: ignore[no-any-return]


@pytest.mark.anyio
async def test_status_and_the_events_snapshot_keep_their_shape(
    fake_app: FakeApp, world: FakeWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        swapper.http.app, "GpuMonitor", lambda: FakeGpu(world, 16384.4, extra_mb=0.3)
    )
    models = {"a": {"vram_mb": 1234.56, "actual_mb": 1000.04}, "b": {}}
    async with fake_app(models, swapper={"state_file": str(tmp_path / "state.json")}) as client:
        assert (await client.post("/models/a/load")).status_code == 200
        assert (
            await client.post(
                "/v1/chat/completions",
                json={"model": "a", "messages": [{"role": "user", "content": "hi"}]},
            )
        ).status_code == 200
        doc = (await client.get("/status")).json()
        snapshot = await _first_event(client)
    for document in (doc, snapshot):
        assert set(document) == TOP_KEYS
        assert set(document["vram"]) == {"budget_mb", "committed_mb", "learned_mb", "gpus"}
        assert set(document["gpu"]) == {"available", "gpus"}
        assert set(document["gpu"]["gpus"][0]) == {
            "index",
            "name",
            "total_mb",
            "used_mb",
            "free_mb",
        }
        assert all(set(m) == MODEL_KEYS for m in document["models"].values())
        a = document["models"]["a"]
        assert a["status"] == "LOADED" and isinstance(a["pid"], int)
        assert ISO_MS.match(a["loaded_at"]) and ISO_MS.match(a["last_used"])
        # Measured (1000.04 MiB), rounded; once measured, the learned size is the prediction.
        assert a["vram_mb"] == 1000.0 and a["predicted_vram_mb"] == 1000.0
        assert document["vram"]["committed_mb"] == 1000.0
        assert document["gpu"]["gpus"][0]["total_mb"] == 16384
    assert doc["models"]["a"]["loaded_at"] == snapshot["models"]["a"]["loaded_at"]


class SlowGpu(FakeGpu):
    """A fake NVML whose reads, once armed, block until the test opens the gate."""

    def __init__(self, world: FakeWorld) -> None:
        super().__init__(world)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.reading = False

    def _block(self) -> None:
        if self.armed:
            self.reading = True
            self.entered.set()
            self.gate.wait(GATE_TIMEOUT)
            self.reading = False

    def gpus(self) -> list[GpuStats]:
        """The one GPU, after the gate opens."""
        self._block()
        return super().gpus()

    def process_memory_mb(self, pid: int) -> float | None:
        """What ``pid`` holds, after the gate opens."""
        self._block()
        return super().process_memory_mb(pid)


@contextlib.contextmanager
def _served(world: FakeWorld, tmp_path: Path) -> Iterator[str]:
    """swapper in-process under uvicorn on loopback, on fake backends; its URL.

    A real server, not the test client: that one runs requests one at a time.
    """
    config, registry = fake_config(world, swapper={"state_file": str(tmp_path / "state.json")})
    with served_in_thread(swapper.http.app.create_app(config, registry)) as url:
        yield url


@pytest.mark.parametrize("path", ["/status", "/metrics"])
def test_slow_nvml_does_not_block_health(
    path: str, world: FakeWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpu = SlowGpu(world)
    monkeypatch.setattr(swapper.http.app, "GpuMonitor", lambda: gpu)
    with _served(world, tmp_path) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        gpu.armed = True
        slow = pool.submit(httpx.get, url + path, timeout=60)
        try:
            assert gpu.entered.wait(GATE_TIMEOUT), f"{path} read no GPU"
            # A read on the event loop would hold /health until the gate's timeout.
            assert httpx.get(url + "/health", timeout=60).status_code == 200
            assert gpu.reading, f"/health waited for the NVML read of {path}"
        finally:
            gpu.gate.set()
        assert slow.result().status_code == 200


def test_the_document_shows_each_gpu_its_budget_and_models() -> None:
    doc = status_document(two_gpu_snapshot(), TWO_GPU_NVML, {})
    assert doc["vram"]["budget_mb"] == 46080.0 and doc["vram"]["committed_mb"] == 34816.4
    assert doc["vram"]["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA RTX 4090",
            "budget_mb": 23040.0,
            "committed_mb": 14336.4,
            "budget_free_mb": 8703.6,
            "models": ["qwen-14b", "big-70b"],
            # This request's NVML reading, the same as the ``gpu`` section's.
            "total_mb": 24564,
            "used_mb": 15101,
        },
        {
            "index": 1,
            "name": "NVIDIA RTX 3090",
            "budget_mb": 23040.0,
            "committed_mb": 20480.0,
            "budget_free_mb": 2560.0,
            "models": ["big-70b"],
            "total_mb": 24576,
            "used_mb": 21001,
        },
    ]
    assert [g["used_mb"] for g in doc["gpu"]["gpus"]] == [15101, 21001]
    assert {m: doc["models"][m]["gpus"] for m in doc["models"]} == {
        "qwen-14b": [0],
        "big-70b": [0, 1],
        "embed": [1],  # where it was last placed; it holds nothing now
    }
    assert list(doc["vram"]) == ["budget_mb", "committed_mb", "learned_mb", "gpus"]


def test_a_gpu_without_an_nvml_reading_or_a_budget_keeps_what_placement_knows() -> None:
    snapshot = two_gpu_snapshot()
    unknown = msgspec.structs.replace(snapshot.vram.gpus[1], budget_mb=None, name=None)
    vram = msgspec.structs.replace(snapshot.vram, gpus=[snapshot.vram.gpus[0], unknown])
    # NVML answered for GPU 1 only: its name comes from there; GPU 0 keeps placement's figures.
    doc = status_document(msgspec.structs.replace(snapshot, vram=vram), TWO_GPU_NVML[1:], {})
    first, second = doc["vram"]["gpus"]
    assert (first["total_mb"], first["used_mb"], first["name"]) == (24564, 15000, "NVIDIA RTX 4090")
    assert (second["budget_mb"], second["budget_free_mb"]) == (None, None)
    assert (second["committed_mb"], second["name"]) == (20480.0, "NVIDIA RTX 3090")
    bare = msgspec.structs.replace(unknown, total_mb=None, used_mb=None)
    vram = msgspec.structs.replace(snapshot.vram, gpus=[bare])
    doc = status_document(msgspec.structs.replace(snapshot, vram=vram), [], {})
    assert doc["vram"]["gpus"] == [
        {
            "index": 1,
            "name": None,
            "budget_mb": None,
            "committed_mb": 20480.0,
            "budget_free_mb": None,
            "models": ["big-70b"],
            "total_mb": None,
            "used_mb": None,
        }
    ]
    assert doc["gpu"] == {"available": False, "gpus": []}
