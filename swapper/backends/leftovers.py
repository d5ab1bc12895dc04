"""Backend process groups left behind by a swapper that died: recorded while they run, killed
at the next start.

The reaper (:mod:`swapper.backends.reaper`) kills every backend group when swapper dies; this is the
belt to its braces, for when the reaper cannot (it was killed too: an OOM killer, a
``kill -9`` on the whole tree, a container runtime). vLLM's EngineCore and tensor-parallel
workers and Ollama's runners would then hold the GPU with nobody to stop them.

Each backend group swapper starts is written to ``process-groups.json`` in the state directory
(next to the learned sizes): its pgid and its leader's start time (``/proc/<pid>/stat`` field
22), and the swapper process that owns it, with that process's start time. A pid is reused
once its process is gone, so a pid alone proves nothing: an entry is only acted on when the
process at that pid started at the recorded time. At startup, :func:`reclaim` kills each
recorded group whose owner is gone (not another swapper sharing the state directory, which
still runs) and whose leader is the recorded process, and drops every entry of a dead owner.
An entry is removed as soon as its group is stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swapper.backends.reaper import reap

__all__ = ["FILE_NAME", "forget", "reclaim", "record", "start_time"]

logger = logging.getLogger("swapper.leftovers")

FILE_NAME = "process-groups.json"

#: The book this swapper process writes to; None until :func:`reclaim` names it.
_path: Path | None = None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22); None when
    there is no such process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int, started: int) -> bool:
    """The very process recorded: that pid, started at that time (not a reused pid)."""
    return start_time(pid) == started


@contextlib.contextmanager
def _book(path: Path) -> Iterator[list[dict[str, Any]]]:
    """The entries, under an exclusive lock (swappers may share a state directory); what the
    block leaves in the list is written back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        try:
            entries = json.loads(handle.read() or "[]")
        except ValueError:
            logger.warning("%s is not JSON; starting it afresh", path)
            entries = []
        if not isinstance(entries, list):
            entries = []
        entries = [
            e
            for e in entries
            if isinstance(e, dict)
            and all(isinstance(e.get(k), int) for k in ("pgid", "start", "owner", "owner_start"))
        ]
        yield entries
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(entries, indent=1))
        handle.flush()


def _me() -> tuple[int, int]:
    pid = os.getpid()
    return pid, start_time(pid) or 0


def reclaim(state_dir: Path) -> list[dict[str, Any]]:
    """At startup: kill the groups a dead swapper left running; record ours here from now on.

    Returns the entries it killed (each also logged as a warning).
    """
    global _path
    path = state_dir / FILE_NAME
    killed: list[dict[str, Any]] = []
    try:
        with _book(path) as entries:
            keep = []
            for entry in entries:
                if _alive(entry["owner"], entry["owner_start"]):
                    keep.append(entry)  # another swapper, still running, owns it
                elif _alive(entry["pgid"], entry["start"]):
                    reap({entry["pgid"]})
                    killed.append(entry)
                    logger.warning(
                        "killed backend process group %d (%s) left running by swapper pid %d, "
                        "which is gone",
                        entry["pgid"],
                        entry.get("name", "?"),
                        entry["owner"],
                    )
            entries[:] = keep
    except OSError as exc:
        logger.warning(
            "cannot use %s (%s): backends left by a killed swapper are not looked for", path, exc
        )
        return killed
    _path = path
    return killed


def record(pgid: int, name: str) -> Path | None:
    """A backend group started: kill it at the next start should this swapper die first.

    Returns the book it went into, for :func:`forget` (None: not recorded).
    """
    started = start_time(pgid)
    path = _path
    if path is None or started is None:
        return None
    owner, owner_start = _me()
    try:
        with _book(path) as entries:
            entries.append(
                {
                    "pgid": pgid,
                    "start": started,
                    "name": name,
                    "owner": owner,
                    "owner_start": owner_start,
                }
            )
    except OSError:
        return None
    return path


def forget(path: Path | None, pgid: int) -> None:
    """The group is stopped: its id may be reused, so nothing may act on it any more."""
    if path is None:
        return
    owner, _ = _me()
    with contextlib.suppress(OSError), _book(path) as entries:
        entries[:] = [e for e in entries if not (e["pgid"] == pgid and e["owner"] == owner)]
