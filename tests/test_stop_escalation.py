"""Stopping a backend that ignores SIGTERM: SIGTERM, ``stop_timeout``, then SIGKILL to its group.

The backend is a real llama-server started, without ``exec``, by a shell script that ignores
SIGTERM and has a child and a grandchild that ignore it too; the script writes every pid to a
file, so the test can check that nothing of the process group survives.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SwapperProcess, chat, process_state, tiny_model, wait_until

pytestmark = pytest.mark.integration

STOP_TIMEOUT = 1.0
#: Extra seconds any bound allows for a machine whose cores are all busy.
SLACK = 5.0
ROLES = ("parent", "child", "grandchild", "server")


@pytest.fixture
def pids_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the stubborn backend writes its pids; any of them still alive after the test is
    killed, so a failing test leaves no strays behind."""
    folder = tmp_path / "pids"
    folder.mkdir()
    yield folder
    for pid in recorded(folder).values():
        if process_state(pid) is not None:
            os.kill(pid, signal.SIGKILL)


def recorded(folder: Path) -> dict[str, int]:
    """The pids the stubborn backend has written so far, by role."""
    return {
        role: int(text)
        for role in ROLES
        if (path := folder / role).exists() and (text := path.read_text().strip())
    }


def stubborn_backend(folder: Path, llama_server: str) -> str:
    """A ``binary`` for a llamacpp entry: llama-server under a shell that ignores SIGTERM."""
    script = folder / "stubborn-llama-server"
    script.write_text(
        "#!/bin/bash\n"
        "trap '' TERM  # ignored here, and inherited as ignored by the child and grandchild\n"
        f'echo $$ > "{folder}/parent"\n'
        f'bash -c \'echo $$ > "{folder}/child"; sleep 600 & echo $! > "{folder}/grandchild"; '
        "wait' &\n"
        f'"{llama_server}" "$@" &\n'
        f'echo $! > "{folder}/server"\n'
        "wait  # never exec: the shell stays the parent of the whole group\n"
    )
    script.chmod(0o755)
    return str(script)


def start(
    swapper_factory: Callable[..., SwapperProcess], pids_dir: Path, llama_server: str
) -> tuple[SwapperProcess, dict[str, int]]:
    """swapper with the stubborn backend loaded; every pid of its group, by role."""
    workdir = swapper_factory.workdir  # type: ignore[attr-defined]
    swapper = swapper_factory(
        swapper={"stop_timeout": STOP_TIMEOUT},
        models={
            "a": tiny_model(workdir, binary=stubborn_backend(pids_dir, llama_server), ctx_size=512)
        },
    )
    answer = chat(swapper, "a")
    assert answer.status_code == 200, answer.text
    pids = wait_until(
        lambda: len(found := recorded(pids_dir)) == len(ROLES) and found,
        SLACK,
        "the backend's pids",
    )
    assert pids["parent"] == swapper.model("a")["pid"]
    assert all(process_state(pid) is not None for pid in pids.values())
    return swapper, pids


def survivors(pids: dict[str, int]) -> dict[str, int]:
    """The processes of the group still alive."""
    return {role: pid for role, pid in pids.items() if process_state(pid) is not None}


def test_unloading_a_backend_that_ignores_sigterm_kills_its_whole_group(
    swapper_factory: Callable[..., SwapperProcess],
    pids_dir: Path,
    llama_server: str,
) -> None:
    swapper, pids = start(swapper_factory, pids_dir, llama_server)
    began = time.monotonic()
    response = swapper.http.post("/models/a/unload")
    took = time.monotonic() - began
    assert response.status_code == 200, response.text
    assert swapper.model("a")["status"] == "UNLOADED"
    assert took >= STOP_TIMEOUT, "SIGTERM was ignored: only SIGKILL after stop_timeout stops it"
    assert took < STOP_TIMEOUT + SLACK
    assert f"[a] did not stop in {STOP_TIMEOUT:.1f}s; killing it" in swapper.output()
    wait_until(lambda: not survivors(pids), SLACK, "the whole process group to be gone")


def test_stopping_swapper_leaves_no_process_of_a_stubborn_backend(
    swapper_factory: Callable[..., SwapperProcess],
    pids_dir: Path,
    llama_server: str,
) -> None:
    swapper, pids = start(swapper_factory, pids_dir, llama_server)
    swapper.signal(signal.SIGTERM)
    # shutdown_timeout (5 s, swapper_factory's) for requests, then stop_timeout per backend.
    # uvicorn re-raises the signal after its graceful shutdown, so the parent sees it
    assert swapper.proc.wait(timeout=5 + STOP_TIMEOUT + SLACK) in (
        -signal.SIGTERM,
        128 + signal.SIGTERM,
    ), swapper.output()
    assert "every backend is down" in swapper.output()
    assert f"[a] did not stop in {STOP_TIMEOUT:.1f}s; killing it" in swapper.output()
    wait_until(lambda: not survivors(pids), SLACK, "the whole process group to be gone")
