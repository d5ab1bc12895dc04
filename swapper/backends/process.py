"""Backend child processes: spawn, watch and stop them without leaving strays; keep their output.

Strays: every child runs in its own session (so a signal to its process group reaches everything
it started) and, on Linux, with ``PR_SET_PDEATHSIG`` = SIGKILL, so it dies with swapper even when
swapper is SIGKILLed. That covers the direct child only, so each group is also registered with
swapper's reaper (:mod:`swapper.backends.reaper`), which kills the whole group when swapper dies.

Output: :mod:`swapper.backends.output` reads it (what is kept, and where it goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from swapper.backends import leftovers
from swapper.backends.output import OutputReader, secret_values
from swapper.backends.reaper import Reaper

__all__ = ["ManagedProcess", "free_port", "port_in_use"]

_PR_SET_PDEATHSIG = 1
logger = logging.getLogger("swapper.process")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on ``host:port`` (a port in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port in TIME_WAIT is free to use; only a live listener is a clash.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _load_prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl


_prctl = _load_prctl()


def _child_setup(parent_pid: int) -> None:
    """Runs in the child between fork and exec: die with the parent."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died before prctl took effect; then nobody would ever kill us.
        if os.getppid() != parent_pid:
            os._exit(1)


class _ReaperSlot:
    """The one reaper of this OS process, started with the first backend.

    A process-wide object on purpose: the reaper belongs to the swapper process (it watches
    that process's death), not to a coordinator or an app, of which a test may make several.
    """

    reaper: Reaper | None = None
    failed = False

    @classmethod
    def get(cls) -> Reaper | None:
        if cls.reaper is not None and cls.reaper.owner == os.getpid():
            return cls.reaper
        if cls.failed:
            return None
        try:
            cls.reaper = Reaper()
        except OSError as error:
            cls.failed = True
            logger.warning(
                "could not start the reaper process (%s): backends' helper "
                "processes may outlive a swapper killed with SIGKILL",
                error,
            )
            return None
        return cls.reaper


class ManagedProcess:
    """One backend process: its group dies with swapper; its output is kept (swapper.backends.output)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        output: int,
        name: str,
        logger: logging.Logger,
        on_line: Callable[[str], None] | None = None,
        secrets: Sequence[str] = (),
        reaper: Reaper | None = None,
    ) -> None:
        self._proc = proc
        self.name = name
        self._logger = logger
        self._reaper = reaper
        #: Where :mod:`swapper.backends.leftovers` recorded the group (None: not recorded).
        self._book: Path | None = None
        self._output = OutputReader(name, logger, on_line, secrets)
        #: The last lines the child printed (bounded), for error messages.
        self.tail = self._output.tail
        #: Set whenever the child prints; readiness polls use it to probe at once.
        self.output_seen = self._output.output_seen
        #: Reads ``output``, the read end of the child's stdout+stderr pipe, until it closes.
        self._pump = asyncio.create_task(self._output.read_pipe(output), name=f"output:{name}")

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        logger: logging.Logger | None = None,
        on_line: Callable[[str], None] | None = None,
        secrets: Sequence[str] = (),
    ) -> ManagedProcess:
        """Start ``argv`` in a new session with stdout and stderr captured.

        ``secrets`` are masked in its output, besides the values of ``--api-key`` and the
        like in ``argv`` itself.
        """
        parent = os.getpid()
        reaper = _ReaperSlot.get()
        # A pipe of our own rather than asyncio's: its reader gathers lines (see output.py).
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_end,
                stderr=asyncio.subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=True,
                preexec_fn=lambda: _child_setup(parent),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        # Until here only PDEATHSIG guards the child; it has had no time to start helpers.
        if reaper is not None:
            reaper.register(proc.pid)
        # Should the reaper die with swapper, the next start kills the group.
        book = leftovers.record(proc.pid, name)
        process = cls(
            proc,
            read_end,
            name,
            logger or logging.getLogger("swapper.backend"),
            on_line,
            [*secret_values(argv), *secrets],
            reaper,
        )
        process._book = book
        return process

    def gather_output(self, gather: bool) -> None:
        """Let its output lines gather between reads (True once it is ready), or read each at
        once (while it starts: the readiness probe runs as soon as it prints)."""
        self._output.gather = gather

    @property
    def output_reads(self) -> int:
        """How many reads of its output pipe so far (each one an event-loop wakeup)."""
        return self._output.reads

    @property
    def pid(self) -> int:
        """The child's pid (also its process-group id)."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self._proc.returncode

    def output_tail(self, lines: int = 10) -> str:
        """The last lines the child printed, for error messages."""
        return "\n".join(list(self.tail)[-lines:])

    async def wait(self) -> int:
        """Wait for the child to exit and its output to be drained; return its exit status."""
        code = await self._proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._pump), timeout=1.0)
        return code

    async def exit_reason(self) -> str:
        """Wait for the child to exit; say how it ended, with its last output lines."""
        code = await self.wait()
        reason = f"exited with status {code}" if code >= 0 else f"killed by signal {-code}"
        tail = self.output_tail(5)
        return f"backend process {reason}" + (f"; last output:\n{tail}" if tail else "")

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def stop(self, grace: float) -> int:
        """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL; return once reaped.

        ``grace <= 0`` skips SIGTERM: the group is killed at once.
        """
        if self._proc.returncode is None and grace > 0:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), timeout=grace)
            except TimeoutError:
                self._logger.warning("[%s] did not stop in %.1fs; killing it", self.name, grace)
        # Kill what is left of the group too: helpers the backend started may outlive it.
        self._signal_group(signal.SIGKILL)
        code = await self.wait()
        if self._reaper is not None:
            self._reaper.forget(self._proc.pid)
        leftovers.forget(self._book, self._proc.pid)
        self._book = None
        return code
