"""A fake GPU whose memory is shared, through files, by every process of a test.

Layout of the directory named by ``$SWAPPER_FAKE_GPU_DIR``::

    gpu.json          {"name": "Fake GPU", "total_mb": 16384, "release_lag": 1.0,
                       "uuid": "GPU-...",                (uuid optional: derived from the name)
                       "devices": [{"name": ..., "total_mb": ..., "uuid": ...}, ...]}
                                                         (optional: N devices; else the one above)
    procs/<pid>.json  {"mb": 1234.0}                     memory held by a live process (device 0)
                      {"mb": 1234.0, "devices": {"0": 617.0, "1": 617.0}}  ... on those devices
                      {"mb": 1234.0, "dead_since": t}    its holder died at (about) time t

Devices are numbered 0..N-1 here; the fake NVML shows device i at index i (after
``FAKE_NVML_OTHER_GPUS`` idle GPUs: at that many more). A process holds its memory on the devices
its ``CUDA_VISIBLE_DEVICES`` names (split evenly, as a tensor-parallel engine does), else on
device 0, where a CUDA program without that variable allocates by default.

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

__all__ = [
    "ENV",
    "Snapshot",
    "configured",
    "default_uuid",
    "devices",
    "hold",
    "hold_devices",
    "setup",
    "snapshot",
    "visible",
]

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
    index: int = 0  # the device's number on the fake GPU


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
    devices: int | list[float] = 1,
) -> None:
    """Create (or reset the description of) a fake GPU in ``directory``: ``devices`` of
    ``total_mb`` each, or one per total listed. Device 0 is ``name`` (and ``uuid``); device i
    is ``name #i``."""
    root = Path(directory)
    (root / "procs").mkdir(parents=True, exist_ok=True)
    totals = devices if isinstance(devices, list) else [total_mb] * devices
    described = [
        {
            "name": name if i == 0 else f"{name} #{i}",
            "total_mb": total,
            "uuid": (uuid if i == 0 else None) or default_uuid(name if i == 0 else f"{name} #{i}"),
        }
        for i, total in enumerate(totals)
    ]
    _write(
        root / "gpu.json",
        {**described[0], "release_lag": release_lag, "devices": described},
    )


def _write(path: Path, data: dict[str, object]) -> None:
    # Unique temporary name per writer (pid + thread-safe nanoseconds), then an atomic rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _descriptions(root: Path) -> tuple[list[dict[str, object]], float]:
    """Each device's description (name, total_mb, uuid) and the release lag."""
    gpu = json.loads((root / "gpu.json").read_text())
    lag = float(gpu.get("release_lag", 1.0))
    listed = gpu.get("devices")
    if not listed:
        name = str(gpu.get("name", "Fake GPU"))
        listed = [{"name": name, "total_mb": gpu["total_mb"], "uuid": gpu.get("uuid")}]
    for device in listed:
        device["uuid"] = device.get("uuid") or default_uuid(str(device["name"]))
    return listed, lag


def visible(directory: str | os.PathLike[str] | None = None) -> list[int] | None:
    """The fake devices the calling process's ``CUDA_VISIBLE_DEVICES`` names, in its order
    (None: unset). Indexes are NVML's (past ``FAKE_NVML_OTHER_GPUS`` idle GPUs); like CUDA, the
    list ends at the first entry naming no fake device."""
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    root = _root(directory)
    if setting is None or root is None or not configured(root):
        return None
    try:
        others = max(0, int(os.environ.get("FAKE_NVML_OTHER_GPUS", "0") or 0))
    except ValueError:
        others = 0
    uuids = [str(d["uuid"]) for d in _descriptions(root)[0]]
    chosen: list[int] = []
    for token in (t.strip() for t in setting.split(",")):
        if token.isdigit():
            found = [int(token) - others] if 0 <= int(token) - others < len(uuids) else []
        else:
            found = [
                i
                for i, u in enumerate(uuids)
                if token and (u == token or (token.startswith("GPU-") and u.startswith(token)))
            ]
        if len(found) != 1 or found[0] in chosen:
            break
        chosen.extend(found)
    return chosen


def hold(
    mb: float, directory: str | os.PathLike[str] | None = None, pid: int | None = None
) -> None:
    """Set the memory the calling process (or its child ``pid``) holds (0 releases it at once):
    split evenly over the devices its ``CUDA_VISIBLE_DEVICES`` names (none when it names none),
    else (unset) on device 0.

    No-op without a fake GPU. ``pid`` lets a server account its memory to a worker child, as
    vLLM's API server does for its EngineCore process.
    """
    root = _root(directory)
    if root is None or not configured(root):
        return
    on = visible(root)
    if on == []:
        # CUDA_VISIBLE_DEVICES names no device (-1, empty, an unknown one): like CUDA, the
        # process sees none and holds nothing.
        hold_devices({}, root, pid)
        return
    on = on or [0]
    hold_devices({i: mb / len(on) for i in on}, root, pid)


def hold_devices(
    per_device: dict[int, float],
    directory: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> None:
    """Set the memory the calling process (or ``pid``) holds on each device (all 0: none)."""
    root = _root(directory)
    if root is None or not configured(root):
        return
    path = root / "procs" / f"{os.getpid() if pid is None else pid}.json"
    total = sum(per_device.values())
    if total <= 0:
        path.unlink(missing_ok=True)
    else:
        devices = {str(i): float(mb) for i, mb in per_device.items() if mb > 0}
        _write(path, {"mb": float(total), "devices": devices})


def _alive(pid: int) -> bool:
    """A pid is alive while /proc says so and it is not a zombie (a zombie's memory is freed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def snapshot(directory: str | os.PathLike[str] | None = None, device: int = 0) -> Snapshot:
    """Read one device of the fake GPU now (see :func:`devices`)."""
    found = devices(directory)
    if not 0 <= device < len(found):
        raise RuntimeError(f"no fake GPU device {device} (there are {len(found)})")
    return found[device]


def devices(directory: str | os.PathLike[str] | None = None) -> list[Snapshot]:
    """Read every device of the fake GPU now; marks newly dead holders and drops those whose
    lag has passed."""
    root = _root(directory)
    if root is None or not configured(root):
        raise RuntimeError(f"no fake GPU: set ${ENV} to a directory made by fakegpu.setup()")
    described, lag = _descriptions(root)
    used = [0.0] * len(described)
    processes: list[dict[int, float]] = [{} for _ in described]
    procs = root / "procs"
    for entry in os.listdir(procs):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        path = procs / entry
        try:
            pid = int(entry[:-5])
            data = json.loads(path.read_text())
            mb = float(data["mb"])
            on = {int(k): float(v) for k, v in (data.get("devices") or {"0": mb}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # vanished between listdir and read, or not ours
        on = {i: v for i, v in on.items() if 0 <= i < len(described)}
        if _alive(pid):
            for i, held in on.items():
                processes[i][pid] = held
                used[i] += held
            continue
        now = time.time()
        dead_since = data.get("dead_since")
        if dead_since is None:
            # First observer of the death starts the release clock.
            with contextlib.suppress(OSError):
                _write(path, {**data, "dead_since": now})
        elif now - float(dead_since) >= lag:
            path.unlink(missing_ok=True)
            continue
        for i, held in on.items():
            used[i] += held
    snapshots = []
    for i, device in enumerate(described):
        total = float(device["total_mb"])  # type: ignore[arg-type]
        snapshots.append(
            Snapshot(
                name=str(device["name"]),
                total_mb=total,
                used_mb=used[i],
                free_mb=max(0.0, total - used[i]),
                processes=processes[i],
                uuid=str(device["uuid"]),
                index=i,
            )
        )
    return snapshots
