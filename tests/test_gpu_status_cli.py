"""``swapper status`` on a node with several GPUs: one line per GPU, and each model's GPUs."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from swapper import operator_cli, operator_format
from swapper.http.admin import status_document
from tests.fakes import FakeWorld
from tests.gpu_snapshots import TWO_GPU_NVML, served_with_two_gpus, two_gpu_snapshot

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
HEADER = ["MODEL", "STATUS", "BACKEND", "PID", "VRAM", "GPU", "IDLE"]
GPU_LINES = [
    "gpu 0 NVIDIA RTX 4090: committed 14336 of budget 23040 MiB (NVML used 15101 of 24564 MiB)"
    " — models qwen-14b, big-70b",
    "gpu 1 NVIDIA RTX 3090: committed 20480 of budget 23040 MiB (NVML used 21001 of 24576 MiB)"
    " — models big-70b",
]


def unloaded() -> dict[str, Any]:
    return {"status": "UNLOADED", "backend": "llamacpp", "pid": None, "vram_mb": None}


def test_status_shows_one_line_per_gpu_and_each_models_gpus() -> None:
    doc = status_document(two_gpu_snapshot(), TWO_GPU_NVML, {})
    assert list(operator_format.status_columns(doc)) == HEADER
    rows = operator_cli.status_rows(doc, NOW)
    assert [row[:6] for row in rows] == [
        ["qwen-14b", "LOADED", "fake", "4101", "9216 MiB", "0"],
        ["big-70b", "LOADED", "fake", "4102", "25600 MiB", "0,1"],
        ["embed", "UNLOADED", "fake", "-", "-", "-"],  # last placed on GPU 1; holds nothing
    ]
    # NVML's own lines give way to the budget lines, which carry its figures.
    assert operator_format.notes(doc) == GPU_LINES
    table = operator_format.plain_table(rows, operator_format.status_columns(doc))
    assert table[0].split() == HEADER
    assert table[2].split()[6] == "0,1"  # after "25600 MiB"


def test_a_gpu_line_says_what_is_unknown() -> None:
    budget = {"index": 2, "name": None, "budget_mb": None, "committed_mb": 0.0, "models": []}
    nvml = {"index": 3, "name": "Other", "total_mb": 100, "used_mb": 1, "free_mb": 99}
    doc = {
        "models": {"m": unloaded()},
        "vram": {"gpus": [budget]},
        "gpu": {"available": True, "gpus": [nvml]},
    }
    assert operator_format.notes(doc) == [
        "gpu 2 ?: committed 0 MiB (budget unknown) — no models",
        "gpu 3 Other: 1 of 100 MiB used, 99 MiB free",  # NVML lists a GPU placement does not
    ]
    # A swapper without per-GPU accounting: the table as before, no GPU column.
    one_budget = {"models": {"m": unloaded()}, "vram": {"gpus": []}}
    assert operator_format.status_columns(one_budget) == operator_format.COLUMNS
    assert operator_cli.status_rows(one_budget, NOW) == [["m", "UNLOADED", "llamacpp"] + ["-"] * 3]


def test_status_against_a_two_gpu_swapper(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with served_with_two_gpus(world, monkeypatch, tmp_path) as url:
        plain, rich = io.StringIO(), io.StringIO()
        operator_cli.show_status(url, None, console=Console(file=plain, width=200))
        operator_cli.show_status(
            url, None, console=Console(file=rich, force_terminal=True, width=200)
        )
    lines = plain.getvalue().splitlines()
    assert lines[1].split() == HEADER
    # The fakes are not loaded: statuses are the running swapper's, GPUs the reported ones.
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["big-70b"] == ["big-70b", "UNLOADED", "fake", "-", "-", "0,1", "-"]
    assert lines[5:] == GPU_LINES
    text = rich.getvalue()
    assert "┃" in text and "GPU" in text
    assert "committed 20480 of budget 23040 MiB" in text
