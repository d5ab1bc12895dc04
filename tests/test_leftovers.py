"""Backend process groups a SIGKILLed swapper left running are killed at the next start.

A "previous run" is simulated: process groups started here, and the state file written as a
swapper that died with them running would have left it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swapper.backends.leftovers import FILE_NAME, start_time
from tests.conftest import SwapperProcess, tiny_model, wait_until

pytestmark = pytest.mark.integration

#: A group leader with a child of its own, as vLLM's API server with its EngineCore.
_GROUP = (
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(600)']); time.sleep(600)"
)


@pytest.fixture
def groups() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start process groups of their own (each in a new session); all are killed after."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", _GROUP], start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _dead_swapper() -> tuple[int, int]:
    """The pid and start time of a process that has ended (the SIGKILLed swapper)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = wait_until(lambda: start_time(proc.pid), 10, "it to start")
    proc.kill()
    proc.wait()
    return proc.pid, started


def _entry(pgid: int, start: int, owner: tuple[int, int], name: str) -> dict[str, Any]:
    return {"pgid": pgid, "start": start, "name": name, "owner": owner[0], "owner_start": owner[1]}


def _members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid``."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,pgid=,stat="], capture_output=True, text=True, check=True
    ).stdout
    return [
        int(pid)
        for pid, group, stat in (line.split()[:3] for line in out.splitlines())
        if int(group) == pgid and not stat.startswith("Z")
    ]


def test_groups_a_killed_swapper_left_are_killed_at_the_next_start(
    swapper_factory: Callable[..., SwapperProcess],
    groups: Callable[[], subprocess.Popen[bytes]],
) -> None:
    workdir: Path = swapper_factory.workdir  # type: ignore[attr-defined]
    leftover, reused, other_swappers = groups(), groups(), groups()
    wait_until(lambda: len(_members(leftover.pid)) == 2, 10, "the leftover's child to start")
    dead = _dead_swapper()
    alive_owner = (
        other_swappers.pid,
        wait_until(lambda: start_time(other_swappers.pid), 10, "a live owner"),
    )
    book = workdir / "state" / "swapper" / FILE_NAME
    book.parent.mkdir(parents=True)
    book.write_text(
        json.dumps(
            [
                # Left by the dead swapper: the very process it started (same pgid, same start time).
                _entry(leftover.pid, start_time(leftover.pid) or 0, dead, "vllm"),
                # The dead swapper's group ended long ago and its pid now belongs to someone else.
                _entry(reused.pid, (start_time(reused.pid) or 0) - 1, dead, "ollama"),
                # Another swapper sharing the state directory, still running: its groups are its own.
                _entry(reused.pid, start_time(reused.pid) or 0, alive_owner, "other"),
            ]
        )
    )

    swapper = swapper_factory(
        models={"tiny-a": tiny_model(workdir)}, swapper={"default_model": "tiny-a"}
    )
    assert leftover.wait(timeout=30) == -9
    assert _members(leftover.pid) == []  # its child too
    assert f"killed backend process group {leftover.pid} (vllm)" in swapper.output()
    # The reused pid and the live swapper's group were left alone.
    assert reused.poll() is None and other_swappers.poll() is None
    assert f"process group {reused.pid}" not in swapper.output()

    # The dead swapper's entries are gone; the live one's stays; this swapper's backend is in.
    loaded = swapper.wait_status("tiny-a", "LOADED")
    entries = json.loads(book.read_text())
    assert [(e["pgid"], e["name"]) for e in entries] == [
        (reused.pid, "other"),
        (loaded["pid"], "tiny-a"),
    ]
    # Stopped, its entry goes: its pid may be reused.
    assert swapper.http.post("/models/tiny-a/unload").status_code == 200
    assert [e["pgid"] for e in json.loads(book.read_text())] == [reused.pid]
