"""A fake GPU whose memory is shared, through files, by every process of a test.

Layout of the directory named by ``$SWAPPER_FAKE_GPU_DIR``::

    gpu.json          {"name": "Fake GPU", "total_mb": 16384, "release_lag": 1.0,
                       "uuid": "GPU-..."}                (uuid optional: derived from the name)
    procs/<pid>.json  {"mb": 1234.0}                     memory held by a live process
                      {"mb": 1234.0, "dead_since": t}    its holder died at (about) time t

A holder's memory counts while its pid lives. When it dies the memory still counts for
``release_lag`` seconds from the moment an observer first notices the death, as CUDA's free-memory
figure lags an unload by 0.5-1.5 s; then the entry is removed. Every write is a temporary file plus
``os.replace``, so readers see whole files or none; files may vanish between listdir and read.

Standard library only: the fake servers and the fake ``pynvml`` import this file by path.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid as uuid_module
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ENV", "Snapshot", "configured", "default_uuid", "hold", "setup", "snapshot"]

ENV = "SWAPPER_FAKE_GPU_DIR"


@dataclass(frozen=True)
class Snapshot:
    """The fake GPU's memory at one moment, in MiB."""

    name: str
    total_mb: float
    used_mb: float
    free_mb: float
    processes: dict[int, float] = field(default_factory=dict)  # live holders only: pid -> MiB
    uuid: str = ""  # NVML's and CUDA's "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"


def _root(directory: str | os.PathLike[str] | None) -> Path | None:
    value = directory if directory is not None else os.environ.get(ENV)
    return Path(value) if value else None


def configured(directory: str | os.PathLike[str] | None = None) -> bool:
    """True when a fake GPU exists (``$SWAPPER_FAKE_GPU_DIR``, or ``directory``, holds gpu.json)."""
    root = _root(directory)
    return root is not None and (root / "gpu.json").is_file()


def default_uuid(name: str) -> str:
    """The UUID a fake GPU called ``name`` gets unless told otherwise (stable across runs)."""
    return f"GPU-{uuid_module.uuid5(uuid_module.NAMESPACE_OID, 'fakegpu:' + name)}"


def setup(
    directory: str | os.PathLike[str],
    total_mb: float = 16384,
    release_lag: float = 1.0,
    name: str = "Fake GPU",
    uuid: str | None = None,
) -> None:
    """Create (or reset the description of) a fake GPU in ``directory``."""
    root = Path(directory)
    (root / "procs").mkdir(parents=True, exist_ok=True)
    _write(
        root / "gpu.json",
        {
            "name": name,
            "total_mb": total_mb,
            "release_lag": release_lag,
            "uuid": uuid or default_uuid(name),
        },
    )


def _write(path: Path, data: dict[str, object]) -> None:
    # Unique temporary name per writer (pid + thread-safe nanoseconds), then an atomic rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def hold(
    mb: float, directory: str | os.PathLike[str] | None = None, pid: int | None = None
) -> None:
    """Set the memory the calling process (or its child ``pid``) holds (0 releases it at once).

    No-op without a fake GPU. ``pid`` lets a server account its memory to a worker child, as
    vLLM's API server does for its EngineCore process.
    """
    root = _root(directory)
    if root is None or not configured(root):
        return
    path = root / "procs" / f"{os.getpid() if pid is None else pid}.json"
    if mb <= 0:
        path.unlink(missing_ok=True)
    else:
        _write(path, {"mb": float(mb)})


def _alive(pid: int) -> bool:
    """A pid is alive while /proc says so and it is not a zombie (a zombie's memory is freed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def snapshot(directory: str | os.PathLike[str] | None = None) -> Snapshot:
    """Read the fake GPU now; marks newly dead holders and drops those whose lag has passed."""
    root = _root(directory)
    if root is None or not configured(root):
        raise RuntimeError(f"no fake GPU: set ${ENV} to a directory made by fakegpu.setup()")
    gpu = json.loads((root / "gpu.json").read_text())
    lag = float(gpu.get("release_lag", 1.0))
    used = 0.0
    processes: dict[int, float] = {}
    procs = root / "procs"
    for entry in os.listdir(procs):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        path = procs / entry
        try:
            pid = int(entry[:-5])
            data = json.loads(path.read_text())
            mb = float(data["mb"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # vanished between listdir and read, or not ours
        if _alive(pid):
            processes[pid] = mb
            used += mb
            continue
        now = time.time()
        dead_since = data.get("dead_since")
        if dead_since is None:
            # First observer of the death starts the release clock.
            with contextlib.suppress(OSError):
                _write(path, {"mb": mb, "dead_since": now})
            used += mb
        elif now - float(dead_since) < lag:
            used += mb
        else:
            path.unlink(missing_ok=True)
    total = float(gpu["total_mb"])
    name = str(gpu.get("name", "Fake GPU"))
    return Snapshot(
        name=name,
        total_mb=total,
        used_mb=used,
        free_mb=max(0.0, total - used),
        processes=processes,
        uuid=str(gpu.get("uuid") or default_uuid(name)),
    )
