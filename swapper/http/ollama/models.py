"""The model documents of Ollama's API: ``/api/tags``, ``/api/ps`` and ``/api/show``.

Facts about a model file come from its GGUF header (:mod:`swapper.gguf_info`); a backend that
serves no local GGUF file (Ollama, vLLM, ...) gets empty details. Which entry field names the
file: ``model_path`` (the llama.cpp backend's).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Mapping
from typing import Any

from swapper.config import Config, ModelEntry
from swapper.errors import ModelNotFound
from swapper.gguf_info import GgufInfo, gguf_info
from swapper.scheduling.coordinator import SwapCoordinator
from swapper.scheduling.model_state import ModelStatus
from swapper.scheduling.snapshot import Snapshot

__all__ = [
    "ModelFile",
    "model_file",
    "ollama_name",
    "ps_document",
    "resolve_name",
    "show_document",
    "tags_document",
]

_MIB = 1024 * 1024
#: How Ollama writes "never expires" (keep_alive -1) in ``expires_at``: far in the future.
_FOREVER = "2318-11-26T00:00:00Z"


def ollama_name(model_id: str) -> str:
    """The name Ollama clients see: the id with ``:latest`` unless it has a tag already."""
    return model_id if ":" in model_id else f"{model_id}:latest"


def resolve_name(coordinator: SwapCoordinator, name: str) -> str:
    """The model id for a name an Ollama client sent: an id or alias, with or without
    ``:latest``; ModelNotFound (404) in Ollama's words otherwise."""
    candidates = [name]
    if name.endswith(":latest"):
        candidates.append(name.removesuffix(":latest"))
    for candidate in candidates:
        try:
            return coordinator.resolve(candidate)
        except ModelNotFound:
            continue
    raise ModelNotFound(f'model "{name}" not found')


class ModelFile:
    """A configured model's file facts: path, size, mtime and GGUF header (when it has one)."""

    __slots__ = ("info", "mtime", "path", "size")

    def __init__(self, path: str | None, size: int, mtime: float, info: GgufInfo | None) -> None:
        self.path = path
        self.size = size
        self.mtime = mtime
        self.info = info

    @property
    def digest(self) -> str:
        """An identifier of this file version (path, size, mtime), not a hash of its bytes:
        hashing a model file would read all of it."""
        key = f"{self.path}\0{self.size}\0{self.mtime}".encode()
        return hashlib.sha256(key).hexdigest()

    def details(self) -> dict[str, Any]:
        """Ollama's ``details`` object."""
        info = self.info
        if info is None:
            return {
                "parent_model": "",
                "format": "",
                "family": "",
                "families": None,
                "parameter_size": "",
                "quantization_level": "",
            }
        return {
            "parent_model": "",
            "format": "gguf",
            "family": info.family,
            "families": [info.family] if info.family else None,
            "parameter_size": info.parameter_size,
            "quantization_level": info.quantization_level,
        }


def model_file(entry: ModelEntry) -> ModelFile:
    """The file facts of ``entry``; blocking (stat, header read): call it from a thread."""
    path = getattr(entry, "model_path", None)
    if not isinstance(path, str):
        return ModelFile(None, 0, 0.0, None)
    try:
        stat = os.stat(path)
    except OSError:
        return ModelFile(path, 0, 0.0, None)
    return ModelFile(path, stat.st_size, stat.st_mtime, gguf_info(path))


def _iso(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def files_of(config: Config, model_ids: list[str]) -> dict[str, ModelFile]:
    """The file facts of each model; blocking: call it from a thread."""
    return {model_id: model_file(config.models[model_id]) for model_id in model_ids}


def tags_document(config: Config, files: Mapping[str, ModelFile]) -> dict[str, Any]:
    """``/api/tags``: every configured model, loaded or not."""
    models = []
    for model_id in config.models:
        file = files[model_id]
        name = ollama_name(model_id)
        models.append(
            {
                "name": name,
                "model": name,
                "modified_at": _iso(file.mtime),
                "size": file.size,
                "digest": file.digest,
                "details": file.details(),
            }
        )
    return {"models": models}


def _context_length(entry: ModelEntry, file: ModelFile) -> int:
    ctx = getattr(entry, "ctx_size", None)
    if isinstance(ctx, int) and ctx > 0:
        return ctx
    if file.info is not None and file.info.context_length is not None:
        return file.info.context_length
    return 0


def ps_document(
    config: Config,
    snapshot: Snapshot,
    files: Mapping[str, ModelFile],
    measured_mb: Mapping[str, float | None],
) -> dict[str, Any]:
    """``/api/ps``: the loaded models, their sizes (VRAM as NVML measures it, else as the
    backend reported) and when the idle ttl would unload them."""
    models = []
    for model_id, model in snapshot.models.items():
        if model.status != ModelStatus.LOADED or model_id not in config.models:
            continue
        entry = config.models[model_id]
        file = files[model_id]
        measured = measured_mb.get(model_id)
        vram_mb = measured if measured is not None else model.vram_mb
        size_vram = int((vram_mb or 0) * _MIB)
        ttl = model.idle_ttl  # the configured ttl, or the last request's keep_alive
        if ttl is None or model.in_flight:
            expires = _FOREVER
        else:
            since = max(model.last_used or 0.0, model.loaded_at or 0.0) or snapshot.wall_time
            expires = _iso(since + ttl)
        name = ollama_name(model_id)
        models.append(
            {
                "name": name,
                "model": name,
                "size": max(file.size, size_vram),
                "digest": file.digest,
                "details": file.details(),
                "expires_at": expires,
                "size_vram": size_vram,
                "context_length": _context_length(entry, file),
            }
        )
    return {"models": models}


def _capabilities(entry: ModelEntry, info: GgufInfo | None) -> list[str]:
    capabilities = ["completion"]
    args = getattr(entry, "args", [])
    if isinstance(args, list) and any(a in ("--embedding", "--embeddings") for a in args):
        capabilities.append("embedding")
    if info is not None and "tools" in info.template:
        capabilities.append("tools")
    if isinstance(args, list) and any(a in ("--mmproj", "-mm") for a in args):
        capabilities.append("vision")
    return capabilities


def show_document(entry: ModelEntry, file: ModelFile) -> dict[str, Any]:
    """``/api/show``: details, GGUF metadata as ``model_info``, and the chat template."""
    info = file.info
    model_info: dict[str, Any] = dict(info.metadata) if info is not None else {}
    if info is not None and info.context_length is None:
        model_info[f"{info.family}.context_length"] = _context_length(entry, file)
    return {
        "license": "",
        "modelfile": f"# served by swapper ({entry.backend} backend)\nFROM {file.path or ''}\n",
        "parameters": "",
        "template": info.template if info is not None else "",
        "details": file.details(),
        "model_info": model_info,
        "capabilities": _capabilities(entry, info),
        "modified_at": _iso(file.mtime),
    }
