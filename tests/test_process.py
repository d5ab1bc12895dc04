"""Backend processes die with swapper, grandchildren included, even when swapper is SIGKILLed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from swapper.backends.reaper import Reaper
from tests.conftest import chat, process_state, tiny_model, wait_until

#: A wrapper that does not ``exec``: llama-server is its child, and a helper subshell forks a
#: ``sleep`` of its own, so the backend's group holds a child, grandchildren and a great-grandchild.
WRAPPER = """#!/bin/bash
echo $$ >> {pids}
( sleep 1000 & echo $! >> {pids}; wait ) &
echo $! >> {pids}
{llama_server} "$@" &
echo $! >> {pids}
wait
"""

#: A process group whose leader starts a child that moves to a process group of its own (but
#: stays in the session), and a grandchild.
GROUP = """
import os, subprocess, sys, time
moved = subprocess.Popen([sys.executable, "-c",
                          "import os, time; os.setpgid(0, 0); time.sleep(1000)"])
child = subprocess.Popen(["bash", "-c", "sleep 1000 & echo $!; wait"], stdout=subprocess.PIPE)
print(os.getpid(), moved.pid, child.pid, child.stdout.readline().decode().strip(), flush=True)
time.sleep(1000)
"""


def live(pids: list[int]) -> list[int]:
    return [pid for pid in pids if process_state(pid) is not None]


def start_group() -> tuple[subprocess.Popen[bytes], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", GROUP], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    pids = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(pids) == 4 and live(pids) == pids
    return proc, pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_the_reaper_kills_registered_groups_and_their_sessions_when_its_pipe_closes() -> None:
    reaper = Reaper()
    registered, doomed = start_group()
    forgotten, spared = start_group()
    try:
        reaper.register(registered.pid)
        reaper.register(forgotten.pid)
        reaper.forget(forgotten.pid)
        reaper.close()  # what swapper's death does: the pipe's write end closes
        registered.wait(timeout=10)
        wait_until(lambda: not live(doomed), 10, "the registered group and session to die")
        assert live(spared) == spared, "a forgotten group must be left alone"
        assert process_state(reaper.pid) is None
    finally:
        for pid in live(doomed + spared):
            os.kill(pid, 9)
        for proc in (registered, forgotten):
            proc.wait(timeout=10)


@pytest.mark.integration
def test_sigkill_of_swapper_takes_a_wrapped_backend_and_its_helpers_down(
    swapper_factory: Any,
    llama_server: str,
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "pids"
    wrapper = tmp_path / "wrapped-llama-server"
    wrapper.write_text(WRAPPER.format(pids=pid_file, llama_server=llama_server))
    wrapper.chmod(0o755)
    swapper = swapper_factory(
        models={"tiny-a": tiny_model(swapper_factory.workdir, binary=str(wrapper))}
    )
    assert chat(swapper, "tiny-a").status_code == 200
    pids = [int(line) for line in pid_file.read_text().split()]
    # The wrapper, its helper subshell, the helper's sleep and llama-server.
    assert len(pids) == 4 and live(pids) == pids
    assert swapper.model("tiny-a")["pid"] == pids[0]
    assert swapper.backends() and set(swapper.backends()) <= set(pids)  # llama-server is ours
    swapper.proc.kill()
    swapper.proc.wait(timeout=10)
    # PDEATHSIG takes the wrapper at once; the reaper has the rest killed right after.
    wait_until(lambda: not live(pids), 10, "every process of the backend's group to die")
    assert swapper.backends() == []
