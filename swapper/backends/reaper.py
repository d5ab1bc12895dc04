"""The reaper: a tiny watcher process that kills every backend process group when swapper dies.

Why a watcher process, and not something else:

* ``PR_SET_PDEATHSIG`` (set on each direct child) fires only for the direct child. A wrapper
  script that runs llama-server without ``exec``, vLLM's engine processes and ``ollama serve``'s
  runners are grandchildren: when swapper is SIGKILLed they are re-parented to init and live on.
* ``PR_SET_CHILD_SUBREAPER`` on swapper makes orphaned grandchildren swapper's children while
  swapper lives, but once swapper itself dies they go to init all the same; and swapper would
  have to reap those zombies itself. It does not help against SIGKILL.
* A cgroup per backend catches everything, even processes that ``setsid`` away, but it needs a
  writable cgroup v2 hierarchy (delegated by systemd or the container runtime). Containers and CI
  runners mostly do not have one (the test machine has a read-only cgroup v1), so it cannot be
  the default.

So swapper starts one reaper per swapper process: ``python -I -S reaper.py`` (stdlib only, it
imports nothing of swapper), in a session of its own so that a Ctrl-C to swapper's terminal does
not reach it. Swapper writes ``+PGID`` to its stdin when a backend starts and ``-PGID`` once the
backend's group is gone. Only swapper holds the pipe's write end (it is close-on-exec, so no
backend inherits it). When swapper dies, however it dies, the kernel closes that end; the reaper
reads end-of-file and SIGKILLs every registered process group, and every process still in one
of those groups' sessions (a child that moved to a new process group but not a new session),
then exits. Only a process that calls ``setsid`` itself escapes; that needs a cgroup. The pipe
closes only when the whole swapper process is gone, whereas ``PR_SET_PDEATHSIG`` fires when the
*thread* that forked the child ends, one more reason not to lean on it alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["Reaper", "reap"]

logger = logging.getLogger("swapper.reaper")


class Reaper:
    """swapper's handle on its reaper process: register and forget backend process groups."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self._broken = False
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The reaper's pid."""
        return self._proc.pid

    def _send(self, message: str) -> None:
        assert self._proc.stdin is not None
        try:
            # A few bytes into a pipe: never blocks in practice, so no need to leave the loop.
            self._proc.stdin.write(f"{message}\n".encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            if not self._broken:
                self._broken = True
                logger.warning(
                    "the reaper process is gone: backends' helper processes may "
                    "outlive a swapper that is killed with SIGKILL"
                )

    def register(self, pgid: int) -> None:
        """Kill this process group when swapper dies."""
        self._send(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        """The group is gone: never signal its id (the pid may be reused)."""
        self._send(f"-{pgid}")

    def close(self) -> None:
        """Let the reaper go now (it kills the groups still registered) and wait for it."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)


def _session_and_group(pid: str) -> tuple[int, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[3]), int(fields[2])  # session, process group


def reap(groups: set[int]) -> None:
    """SIGKILL each group, and every process left in the groups' sessions."""
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if not os.path.isdir("/proc"):
        return
    # Each backend leads its own session (pgid == sid): a child that made itself a new
    # process group is still in the session.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ids = _session_and_group(entry)
            if ids is not None and (ids[0] in groups or ids[1] in groups):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry), signal.SIGKILL)


def _main() -> None:
    # Only end-of-file on stdin ends the reaper: swapper's signals are not its business.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip()
        with contextlib.suppress(ValueError):
            if line.startswith(b"+"):
                groups.add(int(line[1:]))
            elif line.startswith(b"-"):
                groups.discard(int(line[1:]))
    reap(groups)


if __name__ == "__main__":
    _main()
